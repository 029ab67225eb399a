//! Adds `::6/128` to a pod's `lo`: the source of the engine's IPv6
//! connections to apps (as 127.0.0.6 is for IPv4, which needs no address
//! since all of 127/8 is local). One RTM_NEWADDR message over rtnetlink.

use std::{io, mem::size_of, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct IfAddrMsg {
    family: u8,
    prefixlen: u8,
    flags: u8,
    scope: u8,
    index: u32,
}

#[repr(C)]
struct RtAttrAddr6 {
    len: u16,
    kind: u16,
    addr: [u8; 16],
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    ifa: IfAddrMsg,
    local: RtAttrAddr6,
    address: RtAttrAddr6,
}

#[repr(C)]
struct AckMsg {
    hdr: NlMsgHdr,
    error: i32,
}

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_HOST: u8 = 254;

/// Adds `addr`/128 to `lo` of the calling thread's netns. Already present
/// counts as success; a netns without IPv6 returns the kernel's error.
pub fn add_loopback_v6(addr: std::net::Ipv6Addr) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let lo = c"lo";
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(lo.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let attr = |kind| RtAttrAddr6 { len: size_of::<RtAttrAddr6>() as u16, kind, addr: addr.octets() };
    let req = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: libc::RTM_NEWADDR,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
            seq: 1,
            pid: 0,
        },
        ifa: IfAddrMsg {
            family: libc::AF_INET6 as u8,
            prefixlen: 128,
            flags: IFA_F_NODAD,
            scope: RT_SCOPE_HOST,
            index,
        },
        local: attr(IFA_LOCAL),
        address: attr(IFA_ADDRESS),
    };
    // SAFETY: sending the bytes of a #[repr(C)] struct without padding holes
    // the kernel would misread (all fields are naturally aligned).
    let sent = unsafe { libc::send(sock.as_raw_fd(), (&req as *const Request).cast(), size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: reading into a local buffer of the given size.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < size_of::<AckMsg>() as isize {
        return Err(if n < 0 { io::Error::last_os_error() } else { io::Error::other("short netlink ack") });
    }
    // SAFETY: the buffer holds at least an AckMsg; read unaligned.
    let ack: AckMsg = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    match ack.error {
        0 => Ok(()),
        e if -e == libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}
