//! OCI image archives (`oci-archive`: an OCI image layout in a tar) written
//! without a registry or a container engine, reproducibly: tar entries with
//! owner 0, time 0 and fixed modes in sorted order, and no date in any
//! config or index. `cargo xtask images` and the real-node harness's test
//! images use it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::process::Command;

/// Writes `archive`: an OCI layout holding one image named `name` (also its
/// `org.opencontainers.image.ref.name`, the version after the last `:`)
/// with the single uncompressed `layer` and the runtime `config` (the
/// image config's `config` object; its `Labels` also annotate the
/// manifest). Returns the manifest's digest, the image's.
pub fn write_archive(
    archive: &Path,
    name: &str,
    layer: &[u8],
    config: serde_json::Value,
) -> Result<String> {
    let version = name.rsplit_once(':').map_or("latest", |(_, v)| v);
    let labels = config["Labels"].clone();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [sha256(layer)] },
    });
    let config = serde_json::to_vec(&config)?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    });
    if !labels.is_null() {
        manifest["annotations"] = labels;
    }
    let manifest = serde_json::to_vec(&manifest)?;
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["annotations"] = json!({
        "org.opencontainers.image.ref.name": version,
        "io.containerd.image.name": name,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry],
    }))?;
    let mut layout = BTreeMap::new();
    layout.insert(
        "oci-layout".to_owned(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    layout.insert("index.json".to_owned(), index);
    for blob in [layer, &config, &manifest] {
        layout.insert(format!("blobs/sha256/{}", hex_sha256(blob)), blob.to_vec());
    }
    std::fs::write(archive, tar(&layout, 0o644))
        .with_context(|| format!("cannot write {}", archive.display()))?;
    Ok(sha256(&manifest))
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256(blob), "size": blob.len() })
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(bytes))
}

/// A tar stream (ustar) of `files` (path, leading `/` dropped -> bytes),
/// each with `mode`, and the directories above them, in sorted order;
/// owner 0, time 0.
pub fn tar(files: &BTreeMap<String, Vec<u8>>, mode: u32) -> Vec<u8> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let path = path.trim_start_matches('/');
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            at += i + 1;
            dirs.insert(path[..at].to_owned());
        }
    }
    let mut out = Vec::new();
    for dir in &dirs {
        out.extend(header(dir, 0o755, 0, b'5'));
    }
    for (path, bytes) in files {
        out.extend(header(
            path.trim_start_matches('/'),
            mode,
            bytes.len(),
            b'0',
        ));
        out.extend(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// One ustar header block. Paths longer than 100 bytes are split into
/// prefix and name at a `/`.
fn header(path: &str, mode: u32, size: usize, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let (prefix, name) = if path.len() > 100 {
        let cut = path[..path.len().min(155)].rfind('/').unwrap_or(0);
        (&path[..cut], &path[cut + 1..])
    } else {
        ("", path)
    };
    h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size as u64);
    octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len().min(155)]
        .copy_from_slice(&prefix.as_bytes()[..prefix.len().min(155)]);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let field = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(field.as_bytes());
    h
}

/// Writes `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(&text.as_bytes()[text.len() - field.len()..]);
}

/// The files of an image that runs `binary` from `at`: the binary and the
/// shared libraries it links, each at the path the loader asks for (read
/// through symlinks).
pub fn binary_files(binary: &Path, at: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let read = |path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut files = BTreeMap::new();
    files.insert(at.to_owned(), read(binary)?);
    for lib in linked_libraries(binary)? {
        let bytes = read(Path::new(&lib))?;
        files.insert(lib, bytes);
    }
    Ok(files)
}

/// The absolute paths of the shared libraries `binary` loads, the dynamic
/// loader included, as `ldd` reports them; none for a static binary.
pub fn linked_libraries(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd (Debian package libc-bin)")?;
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if said.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output (`name => /path (addr)` or
/// `/path (addr)`; the vDSO has none).
fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_paths_to_copy() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn tar_headers_carry_a_valid_checksum_and_no_owner_or_time() {
        let mut files = BTreeMap::new();
        files.insert("/usr/local/bin/x".to_owned(), b"hello".to_vec());
        let t = tar(&files, 0o755);
        // usr/, usr/local/, usr/local/bin/, the file (one block of data),
        // and two zero blocks.
        assert_eq!(t.len(), 512 * 7);
        let file = &t[512 * 3..512 * 4];
        assert_eq!(&file[..16], b"usr/local/bin/x\0");
        assert_eq!(&file[124..136], b"00000000005\0");
        assert_eq!(&file[136..148], b"00000000000\0");
        let mut blank = file.to_vec();
        blank[148..156].copy_from_slice(b"        ");
        let sum: u32 = blank.iter().map(|b| u32::from(*b)).sum();
        let stored = std::str::from_utf8(&file[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&t[512 * 4..512 * 4 + 5], b"hello");
    }
}
