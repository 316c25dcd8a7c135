//! Packets as `BPF_PROG_TEST_RUN` takes them for skb programs (Ethernet
//! header first), for the tests and the decision-cost benchmark.

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;
/// TCP SYN flag.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;

/// Ethernet + IPv4 + a 20-byte TCP header (or the same bytes under `proto`)
/// from `src`:40000 to `dst`:`port`, with TCP `flags`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, port: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&tcp(port, flags));
    p
}

/// Ethernet + IPv6 + TCP SYN from `src` to `dst`:`port`.
pub fn ipv6_syn(src: [u8; 16], dst: [u8; 16], port: u16) -> Vec<u8> {
    ipv6_with(src, dst, &[], TCP, port, SYN)
}

/// An IPv6 extension header, as [`ipv6_with`] chains them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `len` 8-octet units beyond the first (padding).
    HopByHop(u8),
    /// A routing header (type 0 shape, no addresses left), `len` units.
    Routing(u8),
    /// Destination options, `len` 8-octet units beyond the first.
    DestOpts(u8),
    /// A fragment header: offset in 8-octet units and the more-fragments flag.
    Fragment { offset: u16, more: bool },
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::DestOpts(_) => 60,
            Ext::Fragment { .. } => 44,
        }
    }

    /// The header's bytes, its next-header field set to `next`.
    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(len) | Ext::Routing(len) | Ext::DestOpts(len) => {
                // PadN options fill the header (the routing header's type
                // and segments-left bytes stay 0).
                let mut h = vec![0u8; 8 * (usize::from(len) + 1)];
                h[0] = next;
                h[1] = len;
                if !matches!(self, Ext::Routing(_)) {
                    h[2] = 1;
                    h[3] = (h.len() - 4) as u8;
                }
                h
            }
            Ext::Fragment { offset, more } => {
                let mut h = vec![0u8; 8];
                h[0] = next;
                let field = (offset << 3) | u16::from(more);
                h[2..4].copy_from_slice(&field.to_be_bytes());
                h[4..8].copy_from_slice(&0x7e55_e7a5u32.to_be_bytes());
                h
            }
        }
    }
}

/// Ethernet + IPv6 + the extension headers `exts`, in order, + `proto`'s
/// 20-byte TCP-shaped header from `src` to `dst`:`port` with `flags`.
pub fn ipv6_with(
    src: [u8; 16],
    dst: [u8; 16],
    exts: &[Ext],
    proto: u8,
    port: u16,
    flags: u8,
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.number());
        chain.extend_from_slice(&ext.bytes(next));
    }
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((chain.len() + 20) as u16).to_be_bytes());
    ip[6] = exts.first().map_or(proto, |e| e.number());
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&chain);
    p.extend_from_slice(&tcp(port, flags));
    p
}

/// An Ethernet ARP reply (IPv4) whose sender protocol address is `spa`.
pub fn arp(spa: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0xffu8; 6];
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&0x0806u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]); // Ethernet, IPv4, reply
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&spa);
    p
}

/// Ethernet + IPv6 + an ICMPv6 neighbour advertisement from `src` that
/// claims `target`.
pub fn neighbor_advert(src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&24u16.to_be_bytes());
    ip[6] = 58;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]); // type, code, sum, override
    p.extend_from_slice(&target);
    p
}

/// An Ethernet frame that carries no IP (an ARP-typed header and padding):
/// the program's shortest path.
pub fn not_ip() -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    p
}

fn tcp(port: u16, flags: u8) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_land_where_the_program_reads_them() {
        let p = ipv4([1, 2, 3, 4], [5, 6, 7, 8], TCP, 8080, SYN);
        assert_eq!(p.len(), 14 + 20 + 20);
        assert_eq!(&p[26..30], &[1, 2, 3, 4]);
        assert_eq!(u16::from_be_bytes([p[36], p[37]]), 8080);
        assert_eq!(p[47], SYN);
        let p6 = ipv6_syn([1; 16], [2; 16], 443);
        assert_eq!(p6.len(), 14 + 40 + 20);
        assert_eq!(u16::from_be_bytes([p6[56], p6[57]]), 443);
        let chained = ipv6_with(
            [1; 16],
            [2; 16],
            &[
                Ext::HopByHop(0),
                Ext::DestOpts(1),
                Ext::Fragment {
                    offset: 0,
                    more: false,
                },
            ],
            TCP,
            443,
            SYN,
        );
        // 8 + 16 + 8 bytes of extension headers, each naming the next.
        assert_eq!(chained.len(), 14 + 40 + 32 + 20);
        assert_eq!(
            (chained[20], chained[54], chained[62], chained[78]),
            (0, 60, 44, TCP)
        );
        assert_eq!(u16::from_be_bytes([chained[18], chained[19]]), 52);
        assert_eq!(u16::from_be_bytes([chained[88], chained[89]]), 443);
    }
}
