//! OLM's tools: operator-registry's `opm`, and `bundle-check`
//! (`bundle_check.go`, ours) around operator-framework/api's validators.

use std::path::Path;

use anyhow::Result;

use super::{OPERATOR_API_VERSION, OPERATOR_REGISTRY_VERSION, Recipe, build_into};

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
