//! The few bpf(2) commands aya 0.14 does not offer: batch map updates (and writing a mappable
//! array through a mapping), opening a pinned link,
//! reading a link's cgroup, replacing the program of a cgroup link (BPF_LINK_UPDATE) and
//! detaching it. None of them needs CAP_SYS_ADMIN: objects are opened through their pins
//! (BPF_OBJ_GET), never by id (the *_GET_FD_BY_ID commands do need it).
//!
//! Each error is a [`SyscallError`]: the call's name ("bpf(BPF_LINK_UPDATE)") with its
//! `io::Error` (and errno) as the source.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// A system call that failed: its name, and what it returned as the source. Unlike aya's
/// error of the same name, the text carries the errno's too ("bpf(BPF_OBJ_PIN): File exists
/// (os error 17)"), as the log lines that show only an error's own text need.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SyscallError {
    pub call: &'static str,
    pub source: io::Error,
}

impl SyscallError {
    /// The errno the call returned.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

// The command numbers of `enum bpf_cmd`, from aya's bindings of include/uapi/linux/bpf.h.
use aya_obj::generated::bpf_cmd::{
    self, BPF_BTF_LOAD, BPF_LINK_CREATE, BPF_LINK_DETACH, BPF_LINK_UPDATE, BPF_MAP_DELETE_ELEM,
    BPF_MAP_UPDATE_BATCH, BPF_MAP_UPDATE_ELEM, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD, BPF_OBJ_PIN,
    BPF_RAW_TRACEPOINT_OPEN,
};
/// The kernel's internal "operation not supported" (include/linux/errno.h), which the bpf
/// syscall returns for map types without an operation.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s `link_update` member.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr`'s `obj_pin`/`obj_get` member.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr`'s `link_create` member, up to the fields a cgroup link uses.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The kernel checks that the rest of the union it knows is zero.
    _rest: [u64; 4],
}

// The kernel reads every byte of an attr passed and refuses a non-zero one where it knows no
// field: no attr may have implicit padding, whose bytes are undefined. Each size below is the
// sum of the struct's fields.
const _: () = {
    assert!(size_of::<BatchAttr>() == 4 * 8 + 2 * 4 + 2 * 8);
    assert!(size_of::<LinkUpdateAttr>() == 4 * 4);
    assert!(size_of::<ObjAttr>() == 8 + 2 * 4);
    assert!(size_of::<LinkCreateAttr>() == 4 * 4 + 4 * 8);
    assert!(size_of::<ElemAttr>() == 2 * 4 + 3 * 8);
    assert!(size_of::<BtfLoadAttr>() == 2 * 8 + 4 * 4);
    assert!(size_of::<LinkInfo>() == 4 * 4 + 8 + 2 * 4);
    assert!(size_of::<RawTracepointAttr>() == 8 + 2 * 4);
};

/// A system call's result: its value, or its name and `io::Error`.
pub type Result<T> = std::result::Result<T, SyscallError>;

/// The name errors give a bpf(2) command. Static, so that making an error allocates nothing
/// (a probe calls bpf(2) in a forked child).
fn call(cmd: bpf_cmd) -> &'static str {
    match cmd {
        BPF_BTF_LOAD => "bpf(BPF_BTF_LOAD)",
        BPF_LINK_CREATE => "bpf(BPF_LINK_CREATE)",
        BPF_LINK_DETACH => "bpf(BPF_LINK_DETACH)",
        BPF_LINK_UPDATE => "bpf(BPF_LINK_UPDATE)",
        BPF_MAP_DELETE_ELEM => "bpf(BPF_MAP_DELETE_ELEM)",
        BPF_MAP_UPDATE_BATCH => "bpf(BPF_MAP_UPDATE_BATCH)",
        BPF_MAP_UPDATE_ELEM => "bpf(BPF_MAP_UPDATE_ELEM)",
        BPF_OBJ_GET_INFO_BY_FD => "bpf(BPF_OBJ_GET_INFO_BY_FD)",
        BPF_OBJ_PIN => "bpf(BPF_OBJ_PIN)",
        BPF_OBJ_GET => "bpf(BPF_OBJ_GET)",
        BPF_RAW_TRACEPOINT_OPEN => "bpf(BPF_RAW_TRACEPOINT_OPEN)",
        _ => "bpf",
    }
}

/// bpf(2) with `attr`, a bpf_attr member of its own size: every bpf(2) call tcpmgm makes
/// itself goes through here (aya makes its own), the probes' included.
pub(super) fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised bpf_attr member of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(SyscallError {
            call: call(cmd),
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

/// Writes `len` entries (keys and values of fixed sizes, end to end) with BPF_MAP_UPDATE_BATCH.
/// Returns Ok(false), having written nothing, when the map type has no batch update (the caller
/// then writes one by one).
pub fn update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    len: usize,
    key_size: usize,
    value_size: usize,
) -> Result<bool> {
    const CHUNK: usize = 1 << 16;
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(_) => {}
            // A map type without batch operations fails before anything is written and leaves
            // `count` as it was (Linux 5.10 does so for LPM tries with ENOTSUPP, 524); a kernel
            // that knows the command but refuses the type reports no entry written.
            Err(e)
                if done == 0
                    && (matches!(e.raw_os_error(), Some(libc::ENOTSUP | ENOTSUPP))
                        || (e.raw_os_error() == Some(libc::EINVAL) && attr.count == 0)) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        done += n;
    }
    Ok(true)
}

/// Writes `values` at the start of an array map's values through a shared mapping of the map
/// (an array made with BPF_F_MMAPABLE, Linux 5.5; its values of 8 bytes or a multiple, so end
/// to end): one copy. Ok(false), with nothing written, when the map cannot be mapped (made
/// without the flag).
pub fn write_mapped(map: BorrowedFd<'_>, values: &[u8]) -> Result<bool> {
    if values.is_empty() {
        return Ok(true);
    }
    // SAFETY: sysconf has no memory effects.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = values.len().next_multiple_of(page);
    // SAFETY: a new shared mapping of the map's fd, of no more pages than the map's values
    // take (the kernel refuses more); nothing else refers to it.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENODEV) => Ok(false),
            _ => Err(SyscallError {
                call: "mmap",
                source: e,
            }),
        };
    }
    // SAFETY: the mapping is `len` >= `values.len()` bytes, writable, and this one's alone.
    unsafe {
        std::ptr::copy_nonoverlapping(values.as_ptr(), at.cast::<u8>(), values.len());
        libc::munmap(at, len);
    }
    Ok(true)
}

/// Writes one entry (BPF_MAP_UPDATE_ELEM, BPF_ANY).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Attaches a program to a cgroup as a bpf_link (Linux 5.7) of `attach_type`; the link lives
/// while an fd or a pin of it does.
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: aya_obj::generated::bpf_attach_type,
) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach_type as u32,
        ..LinkCreateAttr::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr`'s raw_tracepoint member.
#[repr(C)]
#[derive(Default)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// Attaches a loaded BTF tracing program (fentry, tp_btf: its target was given at load) and
/// returns its link (BPF_RAW_TRACEPOINT_OPEN, which makes a link a pin can hold from Linux 5.7).
pub fn tracing_attach(program: BorrowedFd<'_>) -> Result<OwnedFd> {
    let mut attr = RawTracepointAttr {
        prog_fd: program.as_raw_fd() as u32,
        ..RawTracepointAttr::default()
    };
    let fd = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)?;
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins an object at a bpffs path.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|e| SyscallError {
        call: call(BPF_OBJ_PIN),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `union bpf_attr`'s element member (the value pointer unused for a delete).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s BTF_LOAD member. `btf_log_true_size` (Linux 6.4, written by the kernel)
/// is spelled out although older kernels do not know it: the struct would otherwise end in 4
/// bytes of padding, passed to the kernel with whatever the stack held, and a kernel that does
/// not know the field refuses a non-zero byte after `btf_log_level` with EINVAL and no log
/// (a release build failed so on 6.1 in some builds, never in a debug build).
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    btf_log_true_size: u32,
}

/// Loads BTF type information into the kernel. A refusal carries the last lines of the
/// kernel's log of it.
pub fn btf_load(data: &[u8]) -> Result<OwnedFd> {
    let mut log = vec![0u8; 1 << 16];
    let mut attr = BtfLoadAttr {
        btf: data.as_ptr() as u64,
        btf_size: data.len() as u32,
        btf_log_buf: log.as_mut_ptr() as u64,
        btf_log_size: log.len() as u32,
        btf_log_level: 1,
        btf_log_true_size: 0,
    };
    match bpf(BPF_BTF_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new fd we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(SyscallError {
                call: e.call,
                source: io::Error::new(e.kind(), format!("{}: {}", e.source, tail.join(" / "))),
            })
        }
    }
}

/// Deletes one element (aya 0.14 has no delete for arrays of maps).
pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// Opens a pinned object (a link, a program or a map) through its bpffs path.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    tcpmgm_common::client::obj_get(path, 0).map_err(|source| SyscallError {
        call: call(BPF_OBJ_GET),
        source,
    })
}

/// `struct bpf_link_info` up to its cgroup member.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What the kernel says of a cgroup link.
#[derive(Clone, Copy, Debug)]
pub struct CgroupLink {
    pub id: u32,
    pub program_id: u32,
    /// The cgroup directory's inode number; 0 once the cgroup is gone (the link is defunct).
    pub cgroup_id: u64,
}

pub fn link_info(link: BorrowedFd<'_>) -> Result<CgroupLink> {
    let mut info = LinkInfo::default();
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(CgroupLink {
        id: info.id,
        program_id: info.prog_id,
        cgroup_id: info.cgroup_id,
    })
}

/// Detaches a link from its cgroup now, whoever else holds it (Linux 5.9).
pub fn link_detach(link: BorrowedFd<'_>) -> Result<()> {
    let mut attr = [link.as_raw_fd() as u32, 0];
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Replaces the program of a link, atomically for that hook.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
