//! HTTP and gRPC tools from the Go module proxy: fortio (load generator and
//! echo server, for `cargo xtask bench waypoint`) and grpcurl (the gRPC
//! client of the waypoint's tests).

use std::path::Path;

use anyhow::Result;

use super::{FORTIO_VERSION, GRPCURL_VERSION, Recipe, build_into};

/// `fortio` and `grpcurl`, static.
pub(super) fn build_http_tools(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/http\n\ngo 1.26.0\n\nrequire (\n\tfortio.org/fortio v{FORTIO_VERSION}\n\tgithub.com/fullstorydev/grpcurl v{GRPCURL_VERSION}\n)\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            packages: &[
                "fortio.org/fortio",
                "github.com/fullstorydev/grpcurl/cmd/grpcurl",
            ],
            env: &[("CGO_ENABLED", "0")],
            ..Recipe::default()
        },
    )
}
