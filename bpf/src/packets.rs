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
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&20u16.to_be_bytes());
    ip[6] = TCP;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&tcp(port, SYN));
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
    }
}
