//! Kfunc calls in the object, resolved for the running kernel. aya relocates
//! no kfunc calls, and a kfunc's BTF id is known only to the kernel that runs
//! it, so each call site carries a marker immediate (`TS_KFUNC_*` in the ABI
//! header) that [`resolve`] replaces with the id from `/sys/kernel/btf/vmlinux`
//! before the object is loaded.

use aya::Btf;
use aya_obj::btf::BtfKind;
use object::{Object, ObjectSection, SectionKind};

use crate::abi::consts;

/// Why the object's kfunc calls could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum KfuncError {
    /// The object is not a readable ELF file.
    #[error("cannot read the eBPF object: {0}")]
    Object(#[from] object::Error),
    /// A section's bytes lie outside the file.
    #[error("section {0} lies outside the eBPF object")]
    Section(String),
}

/// The kfuncs the object calls: the marker each call site carries and the
/// kfunc's name.
pub const KFUNCS: &[(u32, &str)] = &[(consts::TS_KFUNC_SOCK_DESTROY as u32, "bpf_sock_destroy")];

/// `BPF_JMP | BPF_CALL`, and `BPF_PSEUDO_KFUNC_CALL` in the source register.
const CALL: u8 = 0x85;
const KFUNC_CALL_REGS: u8 = 0x20;
const INSN: usize = 8;

/// What [`resolve`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Kfuncs whose calls now carry the kernel's id.
    pub found: Vec<&'static str>,
    /// Kfuncs the kernel does not have: the programs that call them cannot
    /// be loaded.
    pub missing: Vec<&'static str>,
}

/// A copy of `object` with every marked kfunc call patched to the id `btf`
/// (the kernel's) gives it. The copy is 8-byte aligned at the returned
/// offset, as the ELF reader needs.
pub fn resolve(object: &[u8], btf: Option<&Btf>) -> Result<(Aligned, Resolved), KfuncError> {
    let mut out = Aligned::copy_of(object);
    let mut resolved = Resolved::default();
    let ids: Vec<(u32, Option<u32>)> = KFUNCS
        .iter()
        .map(|(marker, name)| {
            let id = btf.and_then(|b| b.id_by_type_name_kind(name, BtfKind::Func).ok());
            match id {
                Some(_) => resolved.found.push(name),
                None => resolved.missing.push(name),
            }
            (*marker, id)
        })
        .collect();
    let file = object::File::parse(object)?;
    let mut patches = Vec::new();
    for section in file.sections() {
        if section.kind() != SectionKind::Text {
            continue;
        }
        let Some((start, size)) = section.file_range() else {
            continue;
        };
        let name = section.name().unwrap_or("?").to_owned();
        let (start, size) = (start as usize, size as usize);
        let code = object
            .get(start..start + size)
            .ok_or_else(|| KfuncError::Section(name.clone()))?;
        for (i, insn) in code.chunks_exact(INSN).enumerate() {
            if insn[0] != CALL || insn[1] != KFUNC_CALL_REGS || insn[2..4] != [0, 0] {
                continue;
            }
            let imm = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if let Some((_, Some(id))) = ids.iter().find(|(marker, _)| *marker == imm) {
                patches.push((start + i * INSN + 4, *id));
            }
        }
    }
    let bytes = out.bytes_mut();
    for (at, id) in patches {
        bytes[at..at + 4].copy_from_slice(&id.to_le_bytes());
    }
    Ok((out, resolved))
}

/// Bytes at an 8-byte aligned address (the ELF reader checks alignment).
#[derive(Debug)]
pub struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn copy_of(data: &[u8]) -> Aligned {
        let mut buf = vec![0u8; data.len() + 8];
        let start = (8 - buf.as_ptr() as usize % 8) % 8;
        buf[start..start + data.len()].copy_from_slice(data);
        Aligned {
            buf,
            start,
            len: data.len(),
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked_calls(object: &[u8]) -> usize {
        object
            .chunks_exact(INSN)
            .filter(|i| {
                i[0] == CALL
                    && i[1] == KFUNC_CALL_REGS
                    && u32::from_le_bytes([i[4], i[5], i[6], i[7]])
                        == consts::TS_KFUNC_SOCK_DESTROY as u32
            })
            .count()
    }

    #[test]
    fn the_object_marks_its_sock_destroy_call() {
        assert!(marked_calls(crate::OBJECT) >= 1);
    }

    #[test]
    fn without_kernel_btf_nothing_is_patched_and_the_kfunc_is_missing() {
        let (out, resolved) = resolve(crate::OBJECT, None).expect("resolve");
        assert_eq!(out.bytes(), crate::OBJECT);
        assert_eq!(resolved.missing, vec!["bpf_sock_destroy"]);
        assert_eq!(out.bytes().as_ptr() as usize % 8, 0);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(resolve(b"not an elf file at all", None).is_err());
    }
}
