//! Just enough rtnetlink to read a network namespace's interfaces and
//! addresses: RTM_GETLINK and RTM_GETADDR dumps, and a reader of their
//! answers that refuses what it cannot read instead of guessing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const IFADDRMSG: usize = 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_MULTI: u16 = 0x2;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
/// Addresses not (or not yet) usable: tentative (duplicate address
/// detection running) or DAD failed.
const IFA_F_UNUSABLE: u32 = 0x40 | 0x08;
const RT_SCOPE_UNIVERSE: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// The dump's sequence number (one request per socket).
const SEQ: u32 = 0x7e55;

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnetlinkError {
    /// A netlink call failed.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The kernel's answer could not be read.
    #[error("malformed rtnetlink answer ({0})")]
    Malformed(&'static str),
}

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

/// One address of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The interface it is on.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Global scope (not host or link scope) and usable (not tentative,
    /// DAD not failed).
    pub global: bool,
}

/// Every interface of the calling thread's network namespace.
pub fn links() -> Result<Vec<Link>, RtnetlinkError> {
    dump(RTM_GETLINK, IFINFOMSG, RTM_NEWLINK, link)
}

/// Every address of the calling thread's network namespace, both families.
pub fn addresses() -> Result<Vec<Address>, RtnetlinkError> {
    dump(RTM_GETADDR, IFADDRMSG, RTM_NEWADDR, address)
}

/// Sends a dump request of `kind` (its family header of `header` zero
/// bytes: every family) and reads the `answer` messages with `read`.
fn dump<T>(
    kind: u16,
    header: usize,
    answer: u16,
    read: fn(&[u8]) -> Result<T, RtnetlinkError>,
) -> Result<Vec<T>, RtnetlinkError> {
    let io = |what: &'static str| move |e: rustix::io::Errno| RtnetlinkError::Io(what, e.into());
    // NETLINK_ROUTE is protocol 0: rustix takes it as None.
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)
        .map_err(io("cannot open a netlink socket"))?;
    let mut request = Vec::with_capacity(NLMSG_HDR + header);
    request.extend_from_slice(&((NLMSG_HDR + header) as u32).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&SEQ.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.resize(NLMSG_HDR + header, 0);
    rustix::net::sendto(
        &fd,
        &request,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )
    .map_err(io("cannot send an rtnetlink dump request"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (_, len) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())
            .map_err(io("cannot read an rtnetlink dump"))?;
        let got = buf
            .get(..len)
            .ok_or(RtnetlinkError::Malformed("a truncated datagram"))?;
        if parse(got, answer, read, &mut out)? {
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

/// Reads one datagram of a dump into `out`, each `answer` message with
/// `read`: true once the dump is done.
pub fn parse<T>(
    mut buf: &[u8],
    answer: u16,
    read: fn(&[u8]) -> Result<T, RtnetlinkError>,
    out: &mut Vec<T>,
) -> Result<bool, RtnetlinkError> {
    let bad = RtnetlinkError::Malformed;
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
                return Err(RtnetlinkError::Io(
                    "the kernel refused the dump",
                    std::io::Error::from_raw_os_error(-errno),
                ));
            }
            k if k == answer => out.push(read(body)?),
            _ => {}
        }
        if flags & NLM_F_MULTI == 0 && kind != answer {
            return Ok(true);
        }
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(false)
}

/// An RTM_NEWADDR body: ifaddrmsg (family, prefix length, flags, scope,
/// interface index), then attributes.
fn address(body: &[u8]) -> Result<Address, RtnetlinkError> {
    let bad = RtnetlinkError::Malformed;
    let header = body.get(..IFADDRMSG).ok_or(bad("a short ifaddrmsg"))?;
    let (family, scope) = (header[0], header[3]);
    let index = u32_at(header, 4).ok_or(bad("a short ifaddrmsg"))?;
    let mut flags = u32::from(header[2]);
    let (mut local, mut address) = (None, None);
    for (kind, value) in attributes(&body[IFADDRMSG..])? {
        match kind {
            IFA_LOCAL => local = Some(ip_of(family, value)?),
            IFA_ADDRESS => address = Some(ip_of(family, value)?),
            IFA_FLAGS => flags = u32_at(value, 0).ok_or(bad("a short IFA_FLAGS"))?,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address where both are given (on a
    // point-to-point link IFA_ADDRESS is the peer's).
    let ip = local
        .or(address)
        .ok_or(bad("an address message without an address"))?;
    Ok(Address {
        index,
        ip,
        global: scope == RT_SCOPE_UNIVERSE && flags & IFA_F_UNUSABLE == 0,
    })
}

fn ip_of(family: u8, value: &[u8]) -> Result<IpAddr, RtnetlinkError> {
    let bad = RtnetlinkError::Malformed;
    match family {
        AF_INET => {
            let octets: [u8; 4] = value
                .get(..4)
                .and_then(|v| v.try_into().ok())
                .ok_or(bad("a short IPv4 address"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        AF_INET6 => {
            let octets: [u8; 16] = value
                .get(..16)
                .and_then(|v| v.try_into().ok())
                .ok_or(bad("a short IPv6 address"))?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => Err(bad("an address of an unknown family")),
    }
}

/// An RTM_NEWLINK body: ifinfomsg, then attributes.
fn link(body: &[u8]) -> Result<Link, RtnetlinkError> {
    let bad = RtnetlinkError::Malformed;
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
fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, RtnetlinkError> {
    let bad = RtnetlinkError::Malformed;
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

fn c_string(value: &[u8]) -> Result<String, RtnetlinkError> {
    let text = value.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec())
        .map_err(|_| RtnetlinkError::Malformed("a name that is not UTF-8"))
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
        assert!(
            !parse(&datagram, RTM_NEWLINK, link, &mut out).unwrap(),
            "not done yet"
        );
        assert!(
            parse(
                &message(NLMSG_DONE, NLM_F_MULTI, &[0; 4]),
                RTM_NEWLINK,
                link,
                &mut out
            )
            .unwrap()
        );
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
            let _ = parse(&good[..cut], RTM_NEWLINK, link, &mut Vec::new());
        }
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&long, RTM_NEWLINK, link, &mut Vec::new()).is_err());
        let mut bad_attr = good.clone();
        bad_attr[NLMSG_HDR + IFINFOMSG..NLMSG_HDR + IFINFOMSG + 2]
            .copy_from_slice(&500u16.to_ne_bytes());
        assert!(parse(&bad_attr, RTM_NEWLINK, link, &mut Vec::new()).is_err());
        let error = message(NLMSG_ERROR, 0, &(-1i32).to_ne_bytes());
        assert!(matches!(
            parse(&error, RTM_NEWLINK, link, &mut Vec::new()),
            Err(RtnetlinkError::Io(..))
        ));
    }

    fn newaddr(family: u8, scope: u8, flags: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 24, 0, scope];
        body.extend_from_slice(&7u32.to_ne_bytes());
        for (kind, value) in attrs {
            body.extend(attr(*kind, value));
        }
        body.extend(attr(IFA_FLAGS, &flags.to_ne_bytes()));
        message(RTM_NEWADDR, NLM_F_MULTI, &body)
    }

    fn read_addresses(datagram: &[u8]) -> Result<Vec<Address>, RtnetlinkError> {
        let mut out = Vec::new();
        parse(datagram, RTM_NEWADDR, address, &mut out)?;
        Ok(out)
    }

    #[test]
    fn addresses_read_back_with_their_scope_and_state() {
        let v6: Ipv6Addr = "fd00::1:10".parse().unwrap();
        let mut datagram = newaddr(
            AF_INET,
            RT_SCOPE_UNIVERSE,
            0,
            &[
                (IFA_ADDRESS, &[10, 0, 0, 9]),
                (IFA_LOCAL, &[198, 18, 1, 10]),
            ],
        );
        datagram.extend(newaddr(AF_INET, 254, 0, &[(IFA_LOCAL, &[127, 0, 0, 1])]));
        datagram.extend(newaddr(
            AF_INET6,
            RT_SCOPE_UNIVERSE,
            0x40,
            &[(IFA_ADDRESS, &v6.octets())],
        ));
        let out = read_addresses(&datagram).unwrap();
        assert_eq!(
            out,
            vec![
                Address {
                    index: 7,
                    ip: "198.18.1.10".parse().unwrap(),
                    global: true
                },
                Address {
                    index: 7,
                    ip: "127.0.0.1".parse().unwrap(),
                    global: false
                },
                Address {
                    index: 7,
                    ip: IpAddr::V6(v6),
                    global: false
                },
            ],
            "IFA_LOCAL wins, host scope and tentative addresses are not global"
        );
    }

    #[test]
    fn damaged_address_messages_are_refused_never_a_panic() {
        let good = newaddr(AF_INET, 0, 0, &[(IFA_LOCAL, &[198, 18, 1, 10])]);
        for cut in 0..good.len() {
            let _ = read_addresses(&good[..cut]);
        }
        assert!(read_addresses(&newaddr(AF_INET, 0, 0, &[(IFA_LOCAL, &[198, 18])])).is_err());
        assert!(read_addresses(&newaddr(99, 0, 0, &[(IFA_LOCAL, &[1, 2, 3, 4])])).is_err());
        assert!(
            read_addresses(&newaddr(AF_INET, 0, 0, &[])).is_err(),
            "no address"
        );
    }
}
