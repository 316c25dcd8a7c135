//! SPIRE's server and agent, built as released.

use std::path::Path;

use anyhow::Result;

use super::{Recipe, SPIRE_VERSION, build_into};

/// See [`build_spire`].
const EJBCA_REPLACE: &str = "replace github.com/Keyfactor/ejbca-go-client-sdk => github.com/Keyfactor/ejbca-go-client-sdk v1.0.2";

pub(super) fn build_spire(dir: &Path) -> Result<()> {
    // SPIRE's go.mod has no replace directives, so requiring it is enough,
    // but for one module: the module proxy here does not serve the EJBCA
    // client SDK version SPIRE 1.15 requires (v1.1.0), only v1.0.2, the one
    // SPIRE 1.13 built its EJBCA plugin against; the plugin's code is the
    // same in both releases. The tests never load that plugin.
    // The server's sqlite datastore needs cgo (go's default when a C
    // compiler is installed; build_into does not turn it off).
    let go_mod = format!(
        "module tessera.dev/testbin/spire\n\ngo 1.26.0\n\nrequire github.com/spiffe/spire v{SPIRE_VERSION}\n\n{EJBCA_REPLACE}\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            packages: &[
                "github.com/spiffe/spire/cmd/spire-agent",
                "github.com/spiffe/spire/cmd/spire-server",
            ],
            ..Recipe::default()
        },
    )
}
