//! Compiles `tessera.bpf.c` with clang-16 for the BPF target, and turns the
//! numeric `#define`s of `include/tessera_abi.h` into Rust constants so the
//! header stays the one source of truth.

use std::path::PathBuf;
use std::process::Command;

const CLANG: &str = "clang-16";

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let source = dir.join("tessera.bpf.c");
    let header = dir.join("include/tessera_abi.h");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", header.display());

    let object = out.join("tessera.bpf.o");
    let status = Command::new(CLANG)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", dir.join("include").display()))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{CLANG} failed to compile {} ({s})", source.display()),
        Err(e) => panic!(
            "cannot run {CLANG} ({e}); install clang-16 and libbpf-dev (`cargo xtask deps` does)"
        ),
    }

    let text = std::fs::read_to_string(&header)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", header.display()));
    let mut consts = String::new();
    for line in text.lines() {
        // Enumerators: `TS_REASON_X = N,`
        let code = line.split("/*").next().unwrap_or_default();
        if let Some((name, value)) = code.trim().trim_end_matches(',').split_once(" = ")
            && name.starts_with("TS_")
            && value.trim().parse::<u64>().is_ok()
        {
            consts.push_str(&format!(
                "/// `{name}` from tessera_abi.h.\npub const {name}: u64 = {};\n",
                value.trim()
            ));
            continue;
        }
        let mut words = code.split_whitespace();
        if words.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let value = value.trim_end_matches("ULL");
        if name.contains('(') || value.parse::<u64>().is_err() {
            continue;
        }
        consts.push_str(&format!(
            "/// `{name}` from tessera_abi.h.\npub const {name}: u64 = {value};\n"
        ));
    }
    std::fs::write(out.join("abi_consts.rs"), consts)
        .unwrap_or_else(|e| panic!("cannot write the ABI constants: {e}"));
}
