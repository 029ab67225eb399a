//! Just enough of the pcap format to tell, per TCP flow between two pods, what crossed the wire: a TLS handshake
//! record, a plaintext string, a reset. Looking per flow (rather than at the whole file) means the mTLS hop's
//! evidence cannot come from another path's packets.

use std::net::Ipv4Addr;

use anyhow::{bail, Context as _};

/// TCP flags byte: RST.
const RST: u8 = 0x04;

#[derive(Debug, Clone)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// The IPv4 TCP segments of a capture (`tcpdump -w`, classic pcap). Other packets are skipped; a truncated last
/// record (tcpdump killed mid-write) ends the list.
pub fn parse(file: &[u8]) -> anyhow::Result<Vec<Segment>> {
    let header = file.get(..24).context("pcap file shorter than its header")?;
    let magic = [header[0], header[1], header[2], header[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let linktype = u32_at(header, 20);
    let mut segments = Vec::new();
    let mut at = 24;
    while let Some(record) = file.get(at..at + 16) {
        let len = u32_at(record, 8) as usize;
        let Some(frame) = file.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        if let Some(segment) = ipv4_payload(linktype, frame).and_then(tcp_segment) {
            segments.push(segment);
        }
    }
    Ok(segments)
}

/// The IPv4 packet inside a frame of the link types `tcpdump -i any` (Linux cooked v1/v2) and a single interface
/// (Ethernet) produce.
fn ipv4_payload(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype_at, header_len) = match linktype {
        1 => (12, 14),   // Ethernet
        113 => (14, 16), // LINUX_SLL
        276 => (0, 20),  // LINUX_SLL2
        _ => return None,
    };
    let ethertype = u16::from_be_bytes([*frame.get(ethertype_at)?, *frame.get(ethertype_at + 1)?]);
    (ethertype == 0x0800).then(|| frame.get(header_len..)).flatten()
}

fn tcp_segment(ip: &[u8]) -> Option<Segment> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = ip.get(ihl..total)?;
    let offset = usize::from(*tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        flags: tcp[13],
        payload: tcp.get(offset..)?.to_vec(),
    })
}

/// The segments of connections between `client` and `server:port`, both directions.
pub struct Flow<'a> {
    segments: Vec<&'a Segment>,
}

impl<'a> Flow<'a> {
    pub fn between(all: &'a [Segment], client: Ipv4Addr, server: Ipv4Addr, port: u16) -> Flow<'a> {
        let segments = all
            .iter()
            .filter(|s| {
                (s.src == client && s.dst == server && s.dport == port)
                    || (s.src == server && s.dst == client && s.sport == port)
            })
            .collect();
        Flow { segments }
    }

    pub fn packets(&self) -> usize {
        self.segments.len()
    }

    pub fn contains(&self, needle: &[u8]) -> bool {
        self.segments.iter().any(|s| s.payload.windows(needle.len()).any(|w| w == needle))
    }

    /// A TLS handshake record header: content type 0x16, then a legacy version 0x0301 (ClientHello) or 0x0303.
    pub fn tls_handshake(&self) -> bool {
        self.contains(&[0x16, 0x03, 0x01]) || self.contains(&[0x16, 0x03, 0x03])
    }

    pub fn reset(&self) -> bool {
        self.segments.iter().any(|s| s.flags & RST != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian pcap with one LINUX_SLL2 frame carrying 10.0.0.1:1000 -> 10.0.0.2:80 with `payload`.
    fn one_packet(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        let mut tcp = vec![0x03, 0xe8, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, flags, 0, 0, 0, 0, 0, 0];
        tcp.extend_from_slice(payload);
        let total = (ip.len() + tcp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend(tcp);
        let mut frame = vec![0x08, 0x00];
        frame.resize(20, 0);
        frame.extend(ip);
        let mut file = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        file.resize(20, 0);
        file.extend(276u32.to_le_bytes());
        file.extend([0u8; 8]);
        file.extend((frame.len() as u32).to_le_bytes());
        file.extend((frame.len() as u32).to_le_bytes());
        file.extend(frame);
        file
    }

    #[test]
    fn flows_see_payload_handshakes_and_resets() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let segments = parse(&one_packet(&[0x16, 0x03, 0x01, 0x02, 0x00], 0x18)).expect("parses");
        assert_eq!(segments.len(), 1);
        let flow = Flow::between(&segments, a, b, 80);
        assert!(flow.tls_handshake() && !flow.reset() && flow.packets() == 1);
        assert_eq!(Flow::between(&segments, a, b, 81).packets(), 0);
        let segments = parse(&one_packet(b"GET /x HTTP/1.1", RST)).expect("parses");
        let flow = Flow::between(&segments, a, b, 80);
        assert!(flow.contains(b"/x") && !flow.tls_handshake() && flow.reset());
        assert!(parse(b"not a pcap file, not at all").is_err());
    }
}
