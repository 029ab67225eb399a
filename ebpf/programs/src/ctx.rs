//! Context field reads. The verifier only accepts context accesses at
//! constant offsets; LLVM likes to merge loads of the IPv4 and IPv6 branches
//! into one load at a computed offset, which the verifier rejects. So every
//! field is read unconditionally (volatile, so none is merged or dropped)
//! and the family only selects among values already read.

use meshcap_common::{v4_mapped, Addr};

#[inline(always)]
pub fn ld(field: &u32) -> u32 {
    // SAFETY: `field` is a valid reference into the program context.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
pub fn ld6(field: &[u32; 4]) -> Addr {
    [ld(&field[0]), ld(&field[1]), ld(&field[2]), ld(&field[3])]
}

/// (local, remote) of a socket, IPv4 as IPv4-mapped.
#[inline(always)]
pub fn ends(family: u32, local4: &u32, remote4: &u32, local6: &[u32; 4], remote6: &[u32; 4]) -> (Addr, Addr) {
    const AF_INET: u32 = 2;
    let (l4, r4, l6, r6) = (ld(local4), ld(remote4), ld6(local6), ld6(remote6));
    if family == AF_INET {
        (v4_mapped(l4), v4_mapped(r4))
    } else {
        (l6, r6)
    }
}
