//! OLM's tools: operator-registry's `opm`, `bundle-check`
//! (`bundle_check.go`, ours) around operator-framework/api's validators,
//! and OLM v0 itself (its operators, CRDs and bundle copier).

use std::path::Path;

use anyhow::Result;

use super::{OLM_VERSION, OPERATOR_API_VERSION, OPERATOR_REGISTRY_VERSION, Recipe, build_into};

pub(super) fn build_olm(dir: &Path) -> Result<()> {
    // operator-registry's own build uses these tags: sqlite's JSON functions,
    // and image signatures checked in Go (no gpgme C library).
    let go_mod = format!(
        "module tessera.dev/testbin/olm\n\ngo 1.26.3\n\nrequire (\n\tgithub.com/operator-framework/api v{OPERATOR_API_VERSION}\n\tgithub.com/operator-framework/operator-registry v{OPERATOR_REGISTRY_VERSION}\n)\n"
    );
    let ldflags = format!(
        "-X github.com/operator-framework/operator-registry/cmd/opm/version.opmVersion=v{OPERATOR_REGISTRY_VERSION}"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            files: &[("cmd/bundle-check/main.go", include_str!("bundle_check.go"))],
            tags: "json1,containers_image_openpgp",
            ldflags,
            packages: &[
                "./cmd/bundle-check",
                "github.com/operator-framework/operator-registry/cmd/opm",
            ],
            ..Recipe::default()
        },
    )
}

/// OLM v0's `olm` and `catalog` operators and `cpb`, static (cpb runs in
/// the bundle image, which has no libc; none of them needs cgo for what
/// the tests use: catalogs served over gRPC, no sqlite), and OLM's CRDs.
pub(super) fn build_lifecycle(dir: &Path) -> Result<()> {
    const OLM: &str = "github.com/operator-framework/operator-lifecycle-manager";
    let go_mod = format!(
        "module tessera.dev/testbin/olm-lifecycle\n\ngo 1.26.3\n\nrequire {OLM} v{OLM_VERSION}\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            tags: "json1,containers_image_openpgp",
            ldflags: format!("-X {OLM}/pkg/version.OLMVersion=v{OLM_VERSION}"),
            packages: &[
                "github.com/operator-framework/operator-lifecycle-manager/cmd/olm",
                "github.com/operator-framework/operator-lifecycle-manager/cmd/catalog",
                "github.com/operator-framework/operator-lifecycle-manager/util/cpb",
            ],
            env: &[("CGO_ENABLED", "0")],
            module_dirs: &[(OLM, "deploy/chart/crds", "crds")],
            ..Recipe::default()
        },
    )
}
