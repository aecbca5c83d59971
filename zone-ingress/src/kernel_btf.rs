//! Where the running kernel keeps a field, read from its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The verdict reads one kernel field that no BPF helper exposes: a received TCP skb's sequence
//! number, `TCP_SKB_CB(skb)->seq`, i.e. `tcp_skb_cb.seq` inside `sk_buff.cb`. Its offset is not
//! ABI; a kernel that moved it would have the verdict read some other field as the sequence
//! number and trim bytes that are not repeats. So the loader asks the kernel's own type
//! information for the offset and hands it to the program, or turns the trim off when it cannot
//! find it.
//!
//! Only what that needs: find a struct by name and a member's byte offset in it, through
//! anonymous struct and union members. aya parses BTF too, but keeps struct members crate-private.
//! Every read is bounds-checked: a malformed file is an error, never a panic.

use std::path::Path;

/// The kernel's BTF, as exposed since 5.4 with `CONFIG_DEBUG_INFO_BTF`.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
/// Anonymous members nest this deep at most before the search gives up (guards a cycle).
const MAX_NESTING: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (a kernel built without CONFIG_DEBUG_INFO_BTF has none)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data or a layout this reader does not know: {0}")]
    Malformed(String),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member} in the kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bit field; a byte offset was expected")]
    BitField { strukt: String, member: String },
}

/// Byte offset of a received TCP skb's sequence number from the start of `struct sk_buff`
/// (`sk_buff.cb` + `tcp_skb_cb.seq`), as the running kernel lays them out.
pub fn tcp_skb_seq_offset() -> Result<u32, BtfError> {
    let btf = Btf::read(Path::new(VMLINUX_BTF))?;
    Ok(btf.member_offset("sk_buff", "cb")? + btf.member_offset("tcp_skb_cb", "seq")?)
}

/// Where the verdict finds how many skbs wait in its socket's redirect queue: the socket an skb
/// belongs to (`sk_buff.sk`), that socket's psock (`sock.sk_user_data`, flag bits in the low
/// three bits), and the length of the psock's `ingress_skb` queue (`sk_psock.ingress_skb.qlen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsockQueueOffsets {
    pub skb_sk: u32,
    pub sk_user_data: u32,
    pub psock_queue_len: u32,
}

/// [`PsockQueueOffsets`] as the running kernel lays them out.
pub fn psock_queue_offsets() -> Result<PsockQueueOffsets, BtfError> {
    let btf = Btf::read(Path::new(VMLINUX_BTF))?;
    Ok(PsockQueueOffsets {
        skb_sk: btf.member_offset("sk_buff", "sk")?,
        sk_user_data: btf.member_offset("sock", "sk_user_data")?,
        psock_queue_len: btf.member_offset("sk_psock", "ingress_skb")?
            + btf.member_offset("sk_buff_head", "qlen")?,
    })
}

/// One type of the type section, with where its members start.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Size, or the referenced type id for typedef, const and the like.
    size_or_type: u32,
    /// Byte position in the type section right after the 12-byte common header.
    data: usize,
}

pub struct Btf {
    types_data: Vec<u8>,
    strings: Vec<u8>,
    /// Index = type id - 1 (id 0 is void).
    types: Vec<Type>,
}

impl Btf {
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the only byte order of the kernels this agent runs on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Malformed(what.to_string());
        if u16_at(data, 0) != Some(MAGIC) {
            return Err(bad("no BTF magic (0xeb9f, little-endian)"));
        }
        let field = |off| u32_at(data, off).ok_or_else(|| bad("header cut short"));
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| data.get(start..end))
                .ok_or_else(|| bad(&format!("{what} section out of bounds")))
        };
        let types_data = section(type_off, type_len, "type")?.to_vec();
        let strings = section(str_off, str_len, "string")?.to_vec();
        let mut types = Vec::new();
        let mut pos = 0;
        while pos < types_data.len() {
            let word = |n: usize| {
                u32_at(&types_data, pos + 4 * n)
                    .ok_or_else(|| bad(&format!("type {} cut short", types.len() + 1)))
            };
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,          // int, var, decl_tag
                3 => 12,                   // array
                4 | 5 => 12 * vlen,        // struct, union: members
                6 | 13 => 8 * vlen,        // enum, func_proto
                15 | 19 => 12 * vlen,      // datasec, enum64
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, tag
                other => return Err(bad(&format!("unknown type kind {other}"))),
            };
            types.push(Type {
                name_off,
                kind,
                vlen,
                kind_flag: info & (1 << 31) != 0,
                size_or_type,
                data: pos + 12,
            });
            pos += 12 + extra;
        }
        if pos != types_data.len() {
            return Err(bad("type section ends inside a type"));
        }
        Ok(Self {
            types_data,
            strings,
            types,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..MAX_NESTING {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in the struct named `strukt` (the first complete struct of that
    /// name), looking into anonymous struct and union members.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        match self.find_member(t, member.as_bytes(), 0)? {
            Some(bits) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::BitField {
                strukt: strukt.to_string(),
                member: member.to_string(),
            }),
            None => Err(BtfError::NoMember {
                strukt: strukt.to_string(),
                member: member.to_string(),
            }),
        }
    }

    /// Bit offset of `member` in struct or union `t`.
    fn find_member(&self, t: &Type, member: &[u8], depth: usize) -> Result<Option<u32>, BtfError> {
        if depth > MAX_NESTING {
            return Ok(None);
        }
        for i in 0..t.vlen {
            let at = t.data + 12 * i;
            let (Some(name_off), Some(type_id), Some(offset)) = (
                u32_at(&self.types_data, at),
                u32_at(&self.types_data, at + 4),
                u32_at(&self.types_data, at + 8),
            ) else {
                return Err(BtfError::Malformed("member cut short".to_string()));
            };
            // With kind_flag the top byte is a bit field's size.
            let bits = if t.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if name_off != 0 {
                if self.name(name_off) == member {
                    return Ok(Some(bits));
                }
                continue;
            }
            if let Some(inner) = self.resolve(type_id)
                && (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                && let Some(found) = self.find_member(inner, member, depth + 1)?
            {
                return Ok(Some(bits + found));
            }
        }
        Ok(None)
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small BTF blob: `struct outer { int a; union { int b; struct { int c; int d; }; }; }`
    /// with `int` as type 1, plus a struct with a bit field.
    fn sample() -> Vec<u8> {
        let strings: &[u8] = b"\0int\0outer\0a\0b\0c\0d\0bits\0f\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap_or_else(|| panic!("{name} not in the sample strings"))
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32, flag: bool| (u32::from(flag) << 31) | (kind << 24) | vlen;
        // 1: int (4 bytes, 32 bits)
        push(&[s("int"), info(1, 0, false), 4, 32]);
        // 2: anonymous struct { int c; int d; }
        push(&[0, info(KIND_STRUCT, 2, false), 8]);
        push(&[s("c"), 1, 0, s("d"), 1, 32]);
        // 3: anonymous union { int b; struct 2; }
        push(&[0, info(KIND_UNION, 2, false), 8]);
        push(&[s("b"), 1, 0, 0, 2, 0]);
        // 4: typedef of 3, so the anonymous member goes through a typedef
        push(&[0, info(KIND_TYPEDEF, 0, false), 3]);
        // 5: struct outer { int a; <anon> at 64 bits }
        push(&[s("outer"), info(KIND_STRUCT, 2, false), 16]);
        push(&[s("a"), 1, 0, 0, 4, 64]);
        // 6: struct bits { int f:3 at bit 5 } (kind_flag: size in the top byte)
        push(&[s("bits"), info(KIND_STRUCT, 1, true), 4]);
        push(&[s("f"), 1, (3 << 24) | 5]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_ones() {
        let btf = Btf::parse(&sample()).expect("the sample parses");
        assert_eq!(btf.member_offset("outer", "a").ok(), Some(0));
        assert_eq!(btf.member_offset("outer", "b").ok(), Some(8));
        assert_eq!(btf.member_offset("outer", "c").ok(), Some(8));
        assert_eq!(btf.member_offset("outer", "d").ok(), Some(12));
        assert!(matches!(
            btf.member_offset("outer", "e"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("inner", "c"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.member_offset("bits", "f"),
            Err(BtfError::BitField { .. })
        ));
    }

    #[test]
    fn malformed_data_is_an_error_at_every_length() {
        let whole = sample();
        assert!(Btf::parse(&whole).is_ok());
        // Every truncation fails cleanly (the header's lengths no longer fit), never a panic.
        for len in 0..whole.len() {
            assert!(
                Btf::parse(&whole[..len]).is_err(),
                "a BTF cut at {len} bytes parsed"
            );
        }
        let mut wrong_magic = whole.clone();
        wrong_magic[0] ^= 0xff;
        assert!(matches!(
            Btf::parse(&wrong_magic),
            Err(BtfError::Malformed(_))
        ));
        // Every single-byte corruption is handled without a panic, whatever it answers.
        for i in 0..whole.len() {
            let mut b = whole.clone();
            b[i] = b[i].wrapping_add(0x55);
            if let Ok(btf) = Btf::parse(&b) {
                let _ = btf.member_offset("outer", "d");
            }
        }
    }

    /// The running kernel: the offset the verdict used as a constant before it was read from BTF
    /// (`cb` at byte 40 of `sk_buff` on x86-64 since 4.x, `seq` first in `tcp_skb_cb`).
    #[test]
    fn this_kernels_tcp_sequence_offset() {
        assert!(
            Path::new(VMLINUX_BTF).exists(),
            "{VMLINUX_BTF} is missing: these tests need a kernel with BTF"
        );
        let btf = Btf::read(Path::new(VMLINUX_BTF)).expect("the kernel's BTF parses");
        assert_eq!(btf.member_offset("sk_buff", "cb").ok(), Some(40));
        assert_eq!(btf.member_offset("tcp_skb_cb", "seq").ok(), Some(0));
        assert_eq!(tcp_skb_seq_offset().ok(), Some(40));
    }

    /// The running kernel has every member the verdict's redirect-queue check reads, at distinct
    /// offsets inside their structs.
    #[test]
    fn this_kernels_psock_queue_offsets() {
        let o = psock_queue_offsets()
            .expect("the kernel's BTF has sk_buff.sk, sock.sk_user_data, sk_psock.ingress_skb");
        eprintln!("{o:?}");
        assert!(o.skb_sk > 0 && o.skb_sk < 256, "{o:?}");
        assert!(o.sk_user_data > 0 && o.sk_user_data < 2048, "{o:?}");
        assert!(o.psock_queue_len > 0 && o.psock_queue_len < 1024, "{o:?}");
    }
}
