//! Compiles proto/*.proto into Rust (prost messages, tonic client and server)
//! when the `grpc` feature is on. protox parses the files in-process, so the
//! build needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if std::env::var_os("CARGO_FEATURE_GRPC").is_none() {
        return Ok(());
    }
    let files = protox::compile(
        [
            "workload.proto",
            "signer.proto",
            "spire/api/types/types.proto",
            "spire/api/server/entry/v1/entry.proto",
            "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)?;
    Ok(())
}
