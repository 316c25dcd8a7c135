//! Just enough rtnetlink to list a network namespace's interfaces: an
//! RTM_GETLINK dump, and a reader of its answer that refuses what it cannot
//! read instead of guessing.

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

use super::VethError;

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_MULTI: u16 = 0x2;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// The dump's sequence number (one request per socket).
const SEQ: u32 = 0x7e55;

/// One interface of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    /// Its index in its namespace.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its kind (`veth`, `bridge`...), when it has one.
    pub kind: Option<String>,
    /// For a veth: the index of its peer (in the peer's namespace).
    pub peer: Option<u32>,
}

/// Every interface of the calling thread's network namespace.
pub fn links() -> Result<Vec<Link>, VethError> {
    let io = |what: &'static str| move |e: rustix::io::Errno| VethError::Netlink(what, e.into());
    // NETLINK_ROUTE is protocol 0: rustix takes it as None.
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)
        .map_err(io("cannot open a netlink socket"))?;
    let mut request = Vec::with_capacity(NLMSG_HDR + IFINFOMSG);
    request.extend_from_slice(&((NLMSG_HDR + IFINFOMSG) as u32).to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&SEQ.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[0u8; IFINFOMSG]);
    rustix::net::sendto(
        &fd,
        &request,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )
    .map_err(io("cannot send RTM_GETLINK"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (_, len) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())
            .map_err(io("cannot read the RTM_GETLINK answer"))?;
        let read = buf
            .get(..len)
            .ok_or(VethError::Malformed("a truncated datagram"))?;
        if parse(read, &mut out)? {
            return Ok(out);
        }
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Reads one datagram of a dump into `out`: true once the dump is done.
pub fn parse(mut buf: &[u8], out: &mut Vec<Link>) -> Result<bool, VethError> {
    let bad = VethError::Malformed;
    while !buf.is_empty() {
        let len = u32_at(buf, 0).ok_or(bad("a short message header"))? as usize;
        let kind = u16_at(buf, 4).ok_or(bad("a short message header"))?;
        let flags = u16_at(buf, 6).ok_or(bad("a short message header"))?;
        if len < NLMSG_HDR || len > buf.len() {
            return Err(bad("a message length outside the datagram"));
        }
        let body = &buf[NLMSG_HDR..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).ok_or(bad("a short error message"))? as i32;
                return Err(VethError::Netlink(
                    "RTM_GETLINK refused",
                    std::io::Error::from_raw_os_error(-errno),
                ));
            }
            RTM_NEWLINK => out.push(link(body)?),
            _ => {}
        }
        if flags & NLM_F_MULTI == 0 && kind != RTM_NEWLINK {
            return Ok(true);
        }
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(false)
}

/// An RTM_NEWLINK body: ifinfomsg, then attributes.
fn link(body: &[u8]) -> Result<Link, VethError> {
    let bad = VethError::Malformed;
    let index = u32_at(body, 4).ok_or(bad("a short ifinfomsg"))?;
    let mut link = Link {
        index,
        ..Link::default()
    };
    for (kind, value) in attributes(body.get(IFINFOMSG..).unwrap_or_default())? {
        match kind {
            IFLA_IFNAME => link.name = c_string(value)?,
            IFLA_LINK => link.peer = Some(u32_at(value, 0).ok_or(bad("a short IFLA_LINK"))?),
            IFLA_LINKINFO => {
                for (inner, value) in attributes(value)? {
                    if inner == IFLA_INFO_KIND {
                        link.kind = Some(c_string(value)?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

/// The (type, value) of each attribute in `buf`.
fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, VethError> {
    let bad = VethError::Malformed;
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0).ok_or(bad("a short attribute"))?);
        let kind = u16_at(buf, 2).ok_or(bad("a short attribute"))? & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(bad("an attribute length outside its message"));
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

fn c_string(value: &[u8]) -> Result<String, VethError> {
    let text = value.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| VethError::Malformed("a name that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&SEQ.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn newlink(index: u32, name: &str, kind: Option<&str>, peer: Option<u32>) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body.extend(attr(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        if let Some(peer) = peer {
            body.extend(attr(IFLA_LINK, &peer.to_ne_bytes()));
        }
        if let Some(kind) = kind {
            let inner = attr(IFLA_INFO_KIND, format!("{kind}\0").as_bytes());
            body.extend(attr(IFLA_LINKINFO | 0x8000, &inner));
        }
        message(RTM_NEWLINK, NLM_F_MULTI, &body)
    }

    #[test]
    fn a_dump_reads_back_names_kinds_and_peers() {
        let mut datagram = newlink(1, "lo", None, None);
        datagram.extend(newlink(7, "eth0", Some("veth"), Some(42)));
        let mut out = Vec::new();
        assert!(!parse(&datagram, &mut out).unwrap(), "not done yet");
        assert!(parse(&message(NLMSG_DONE, NLM_F_MULTI, &[0; 4]), &mut out).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1],
            Link {
                index: 7,
                name: "eth0".into(),
                kind: Some("veth".into()),
                peer: Some(42),
            }
        );
    }

    #[test]
    fn damaged_answers_are_refused_never_a_panic() {
        let good = newlink(7, "eth0", Some("veth"), Some(42));
        for cut in 0..good.len() {
            let _ = parse(&good[..cut], &mut Vec::new());
        }
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&long, &mut Vec::new()).is_err());
        let mut bad_attr = good.clone();
        bad_attr[NLMSG_HDR + IFINFOMSG..NLMSG_HDR + IFINFOMSG + 2]
            .copy_from_slice(&500u16.to_ne_bytes());
        assert!(parse(&bad_attr, &mut Vec::new()).is_err());
        let error = message(NLMSG_ERROR, 0, &(-1i32).to_ne_bytes());
        assert!(matches!(
            parse(&error, &mut Vec::new()),
            Err(VethError::Netlink(..))
        ));
    }
}
