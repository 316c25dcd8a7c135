//! What the waypoint decides for each request: the path in its canonical
//! form ([`path`]), the workload's rules applied to the request and its
//! source identity ([`rules`]), and the request forwarded or the answer
//! the client gets instead ([`gate`]).

pub mod gate;
pub mod path;
pub mod rules;

pub use gate::{Gate, Refusal, XFCC, gate, identity_header, is_grpc};
pub use path::normalise;
pub use rules::{Decision, Request, Rules, Source};

/// A request path the waypoint refuses (400): the client gets a short
/// reason, and the workload never sees the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The request target is not a path (`*`, or no leading `/`).
    #[error("the request target is not an absolute path")]
    NotOriginForm,
    /// A `%` not followed by two hex digits.
    #[error("the path has a malformed percent-encoding")]
    BadEncoding,
    /// `%2F`: servers disagree on whether it separates segments.
    #[error("the path has an encoded slash (%2F)")]
    EncodedSlash,
    /// `\` or `%5C`: some servers take it for a slash.
    #[error("the path has a backslash")]
    Backslash,
    /// A NUL byte, literal or `%00`.
    #[error("the path has a NUL byte")]
    Nul,
}

/// A workload's rules that cannot be compiled for requests (the API
/// server's validation lets none through; the waypoint then refuses every
/// request of the workload's HTTP ports rather than guess).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A path regex that does not compile, or compiles too large.
    #[error(
        "rule {rule}: path regex {pattern:?} is refused: {reason}; check the AuthPolicy's http paths"
    )]
    Regex {
        /// The rule's index in the compiled policy.
        rule: usize,
        /// The expression.
        pattern: String,
        /// What the regex compiler said.
        reason: String,
    },
    /// A port outside 1-65535.
    #[error("rule {rule}: port {port} is not a TCP port")]
    Port {
        /// The rule's index in the compiled policy.
        rule: usize,
        /// The port.
        port: i32,
    },
}
