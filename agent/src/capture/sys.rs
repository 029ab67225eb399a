//! The few bpf(2) commands aya 0.14 does not expose: walking a map's keys
//! whatever their type, opening a pin as a plain fd, and swapping the
//! program behind a link.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`,
    // valid for the call; the kernel reads at most size_of::<T>() bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_MAP_GET_NEXT_KEY on raw bytes (`None` = first key). False at the end.
pub fn map_get_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> bool {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: next.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_GET_NEXT_KEY, &attr).is_ok()
}

/// BPF_OBJ_GET: an fd for a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let fd = bpf(BPF_OBJ_GET, &Attr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 })?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: the link (same id, same attachment) now runs `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    bpf(
        BPF_LINK_UPDATE,
        &Attr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 },
    )
    .map(drop)
}
