//! Kubernetes label selectors evaluated against a pod's or namespace's
//! labels (WorkloadIdentity and AuthPolicy selectors alike).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a label selector cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// An operator other than In, NotIn, Exists, DoesNotExist.
    #[error("unknown selector operator {0:?}; use In, NotIn, Exists or DoesNotExist")]
    UnknownOperator(String),
    /// In or NotIn without values, or Exists/DoesNotExist with values.
    #[error("selector operator {operator} on key {key:?} {problem}")]
    BadValues {
        /// The operator.
        operator: String,
        /// The label key.
        key: String,
        /// What is wrong with the values.
        problem: &'static str,
    },
}

/// True when `labels` satisfy `selector`; an absent selector matches everything.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Ok(false);
        }
    }
    for req in selector.match_expressions.iter().flatten() {
        let values = req.values.as_deref().unwrap_or_default();
        let bad = |problem| SelectorError::BadValues {
            operator: req.operator.clone(),
            key: req.key.clone(),
            problem,
        };
        let have = labels.get(&req.key);
        let ok = match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => return Err(bad("needs values")),
            "Exists" | "DoesNotExist" if !values.is_empty() => return Err(bad("takes no values")),
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => return Err(SelectorError::UnknownOperator(other.to_owned())),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}
