//! `olm/bundle/` as OperatorHub's pipeline checks it: operator-framework/api's
//! validators (default bundle checks, OperatorHub v2, standard capabilities
//! and categories, good practices, deprecated APIs) find no error, and a
//! catalog made of the bundle renders and validates with operator-registry's
//! `opm`. Each check is also run on a broken copy to show it can fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::Value;
use tessera_tests::olm::catalog::{self, output};
use tessera_tests::testbin::KUBERNETES_VERSION;
use tessera_tests::{TestBins, repo_root};

/// The validators bundle-check runs, by the names it reports them under.
const VALIDATORS: [&str; 6] = [
    "default",
    "operatorhub-v2",
    "standard-capabilities",
    "standard-categories",
    "good-practices",
    "deprecated-apis",
];

/// The validators' findings for the bundle in `dir`: (errors, warnings),
/// each as "validator: detail".
fn validate(bins: &TestBins, dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let minor = KUBERNETES_VERSION
        .rsplit_once('.')
        .map_or(KUBERNETES_VERSION, |(m, _)| m);
    let json = output(&bins.bundle_check, &[dir.to_str().unwrap(), minor])?;
    let results: Vec<Value> = serde_json::from_str(&json)?;
    for name in VALIDATORS {
        if !results.iter().any(|r| r["validator"] == name) {
            bail!("bundle-check reported nothing from the {name} validators:\n{json}");
        }
    }
    let collect = |field: &str| -> Vec<String> {
        results
            .iter()
            .flat_map(|r| {
                let validator = r["validator"].as_str().unwrap_or("?").to_owned();
                r[field]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |f| format!("{validator}: {}", f["detail"].as_str().unwrap_or("?")))
            })
            .collect()
    };
    Ok((collect("errors"), collect("warnings")))
}

/// A copy of `olm/bundle/` whose CSV `edit` changed.
fn broken_copy(edit: impl FnOnce(&mut Value)) -> Result<tempfile::TempDir> {
    // The bundle loader skips hidden paths, so no leading dot.
    let copy = tempfile::Builder::new().prefix("bundle-").tempdir()?;
    let source = repo_root().join("olm/bundle");
    for sub in ["manifests", "metadata"] {
        std::fs::create_dir_all(copy.path().join(sub))?;
        for entry in std::fs::read_dir(source.join(sub))? {
            let path = entry?.path();
            std::fs::copy(&path, copy.path().join(sub).join(path.file_name().unwrap()))?;
        }
    }
    let csv_path = copy
        .path()
        .join("manifests/tessera.clusterserviceversion.yaml");
    let mut csv: Value = serde_yaml::from_str(&std::fs::read_to_string(&csv_path)?)?;
    edit(&mut csv);
    // JSON is YAML too.
    std::fs::write(&csv_path, serde_json::to_string_pretty(&csv)?)?;
    Ok(copy)
}

#[test]
fn operator_framework_validators_find_no_error_in_the_bundle() -> Result<()> {
    let bins = TestBins::locate()?;
    let (errors, warnings) = validate(&bins, &repo_root().join("olm/bundle"))?;
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    assert!(
        errors.is_empty(),
        "the validators found errors:\n{}",
        errors.join("\n")
    );
    Ok(())
}

#[test]
fn the_validators_catch_a_broken_bundle() -> Result<()> {
    let bins = TestBins::locate()?;
    let broken = broken_copy(|csv| {
        let annotations = &mut csv["metadata"]["annotations"];
        annotations["capabilities"] = "Runs Itself".into();
        annotations["categories"] = "Not A Category".into();
        annotations["alm-examples"] = "[{not json".into();
    })?;
    let (errors, _) = validate(&bins, broken.path())?;
    let all = errors.join("\n");
    for (validator, what) in [
        ("standard-capabilities", "capabilities"),
        ("standard-categories", "categor"),
        ("default", "invalid example"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(validator) && e.contains(what)),
            "no {validator} error about {what}:\n{all}"
        );
    }
    Ok(())
}

/// The image a release publishes the bundle as.
const BUNDLE_IMAGE: &str = "localhost/tessera/tessera-bundle:0.1.0";

#[test]
fn opm_renders_and_validates_a_catalog_of_the_bundle() -> Result<()> {
    let bins = TestBins::locate()?;
    let dir = tempfile::tempdir()?;
    let bundle = repo_root().join("olm/bundle");
    catalog::write(
        &bins.opm,
        &bundle,
        BUNDLE_IMAGE,
        dir.path(),
        &catalog::csv_name(&bundle)?,
    )?;
    output(&bins.opm, &["validate", dir.path().to_str().unwrap()])?;

    // A channel naming a bundle the catalog does not hold fails validation.
    let wrong = tempfile::tempdir()?;
    catalog::write(
        &bins.opm,
        &bundle,
        BUNDLE_IMAGE,
        wrong.path(),
        "tessera.v9.9.9",
    )?;
    let refused = output(&bins.opm, &["validate", wrong.path().to_str().unwrap()]);
    assert!(
        refused.is_err(),
        "opm validate accepted a channel without its bundle"
    );
    Ok(())
}
