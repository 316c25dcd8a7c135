//! The kernel side of enforcement on one node: what the eBPF maps should
//! hold ([`view`], computed from the cluster without side effects, and
//! [`policy`], compiled rules by numeric identity), the maps themselves
//! with the persistent [`authcache`] behind the auth map ([`maps`]), pods'
//! addresses before their status has them ([`sandbox`]), where their
//! traffic enters the node ([`veths`]), other nodes' address ranges
//! ([`nodes`]), and the revocation of connections the maps no longer allow
//! ([`revocation`]).

pub mod authcache;
pub mod maps;
pub mod nodes;
pub mod policy;
pub mod revocation;
pub mod sandbox;
pub mod veths;
pub mod view;

use tessera_bpf::datapath::DatapathError;

use authcache::AuthCacheError;
pub use authcache::{Authenticated, Generations};
pub use maps::{DataPlane, Stats};
pub use view::View;

/// Why the data path could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// Loading or pinning the eBPF object failed.
    #[error("eBPF data path: {0}")]
    Datapath(#[from] DatapathError),
    /// The auth cache failed.
    #[error(transparent)]
    Cache(#[from] AuthCacheError),
}
