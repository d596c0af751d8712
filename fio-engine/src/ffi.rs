//! The `extern "C"` boundary: what `src/shim.c` calls, and `get_ioengine`,
//! the symbol fio looks up in an external engine. All of this crate's
//! `unsafe` is here: C strings in, error text out, fio's buffers (read
//! from at `queue`, written at `event`), and the engine handle.
//!
//! No panic crosses into C: each entry point catches it and reports it as
//! an error.
#![allow(unsafe_code)]

use crate::config::{EngineConfig, RawConfig};
use crate::engine::{errno, probe_size, Engine, Op, QueueError};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// `struct fib_config` of src/shim.c (same fields, same order).
#[repr(C)]
pub struct FibConfig {
    pub paths: *const c_char,
    pub transport: *const c_char,
    pub policy: *const c_char,
    pub initiator: *const c_char,
    pub chap_user: *const c_char,
    pub chap_secret_file: *const c_char,
    pub target_user: *const c_char,
    pub target_secret_file: *const c_char,
    pub cores: *const c_char,
    pub busy_poll: c_uint,
    pub no_path_timeout_s: c_uint,
    pub login_timeout_s: c_uint,
    pub queue_depth: c_uint,
    pub nr_files: c_uint,
}

extern "C" {
    /// The shim's `struct ioengine_ops` (a static in src/shim.c).
    fn fib_shim_ops() -> *mut c_void;
}

/// fio's entry point into an external engine without an `ioengine` symbol:
/// fills in the ops.
///
/// # Safety
/// `ops` is a valid pointer to write one pointer to (fio passes `&ops`).
#[no_mangle]
pub unsafe extern "C" fn get_ioengine(ops: *mut *mut c_void) {
    if ops.is_null() {
        return;
    }
    // SAFETY: fib_shim_ops only returns the address of a static; `ops` is
    // non-null and points to fio's local `struct ioengine_ops *`.
    unsafe { *ops = fib_shim_ops() };
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for this call.
unsafe fn opt_string(p: *const c_char, what: &str) -> Result<Option<String>, String> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller guarantees a NUL-terminated string
    // (fio's option storage or a fio_file's file_name) alive for the call.
    let s = unsafe { CStr::from_ptr(p) };
    let s = s
        .to_str()
        .map_err(|_| format!("{what} is not valid UTF-8"))?
        .trim();
    Ok((!s.is_empty()).then(|| s.to_string()))
}

/// Writes `msg` into the caller's buffer, NUL-terminated, cut to fit.
///
/// # Safety
/// `err` is null or valid for `len` bytes of writes.
unsafe fn set_err(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `err` has room for `len` bytes and n + 1 <= len; the source
    // is a live &str of at least n bytes and cannot overlap C's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// # Safety
/// `c` is null or points to a valid `struct fib_config` whose strings are
/// null or NUL-terminated.
unsafe fn raw_config(c: *const FibConfig) -> Result<RawConfig, String> {
    if c.is_null() {
        return Err("no engine configuration".into());
    }
    // SAFETY: non-null, and the shim passes its stack `struct fib_config`,
    // laid out as FibConfig (repr(C), same fields).
    let c = unsafe { &*c };
    let s = |p, what| {
        // SAFETY: the strings are fio's option values (or null),
        // NUL-terminated, alive while the job runs.
        unsafe { opt_string(p, what) }
    };
    Ok(RawConfig {
        paths: s(c.paths, "iscsi_paths")?,
        transport: s(c.transport, "iscsi_transport")?,
        policy: s(c.policy, "iscsi_policy")?,
        initiator: s(c.initiator, "iscsi_initiator")?,
        chap_user: s(c.chap_user, "iscsi_chap_user")?,
        chap_secret_file: s(c.chap_secret_file, "iscsi_chap_secret_file")?,
        target_user: s(c.target_user, "iscsi_target_user")?,
        target_secret_file: s(c.target_secret_file, "iscsi_target_secret_file")?,
        cores: s(c.cores, "iscsi_cores")?,
        busy_poll: c.busy_poll != 0,
        no_path_timeout_s: c.no_path_timeout_s,
        login_timeout_s: c.login_timeout_s,
        queue_depth: c.queue_depth,
        nr_files: c.nr_files,
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// # Safety
/// As [`raw_config`].
unsafe fn engine_config(c: *const FibConfig) -> Result<EngineConfig, String> {
    // SAFETY: forwarded from the caller.
    let raw = unsafe { raw_config(c) }?;
    EngineConfig::parse(&raw, &env).map_err(|e| e.to_string())
}

fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            Err(format!("internal error (panic): {what}"))
        }
    }
}

/// # Safety
/// `eng` is null or a handle from [`fib_engine_new`] not yet freed, used by
/// one thread at a time (fio's job thread).
unsafe fn engine<'a>(eng: *mut c_void) -> Result<&'a mut Engine, String> {
    if eng.is_null() {
        return Err("engine not initialised".into());
    }
    // SAFETY: the caller passes a live Box<Engine> pointer from
    // fib_engine_new, not aliased (fio calls the engine from its job
    // thread only).
    Ok(unsafe { &mut *eng.cast::<Engine>() })
}

/// Checks the options (fio's `setup`): 0, or -1 with the reason in `err`.
///
/// # Safety
/// `c` as [`raw_config`]; `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_check_config(
    c: *const FibConfig,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    match catch(|| unsafe { engine_config(c) }.map(|_| ())) {
        Ok(()) => 0,
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &e) };
            -1
        }
    }
}

/// Logs in to `url`'s paths and reads the LU's size (fio's `get_file_size`).
///
/// # Safety
/// `c` as [`raw_config`]; `url` NUL-terminated; `bytes` valid for a write;
/// `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_probe_size(
    c: *const FibConfig,
    url: *const c_char,
    bytes: *mut u64,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let cfg = unsafe { engine_config(c) }?;
        // SAFETY: fio's file_name, NUL-terminated.
        let url = unsafe { opt_string(url, "file name") }?.ok_or("empty file name")?;
        probe_size(&cfg, &url)
    });
    match r {
        Ok(b) if !bytes.is_null() => {
            // SAFETY: non-null, the shim's local uint64_t.
            unsafe { *bytes = b };
            0
        }
        Ok(_) => 0,
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &e) };
            -1
        }
    }
}

/// A new engine for one fio job (fio's `init`); null with `err` set.
///
/// # Safety
/// `c` as [`raw_config`]; `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_engine_new(
    c: *const FibConfig,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    // SAFETY: forwarded from the caller.
    match catch(|| unsafe { engine_config(c) }) {
        Ok(cfg) => Box::into_raw(Box::new(Engine::new(cfg))).cast(),
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &e) };
            std::ptr::null_mut()
        }
    }
}

/// Frees an engine (fio's `cleanup`), closing its devices.
///
/// # Safety
/// `eng` is null or a handle from [`fib_engine_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn fib_engine_free(eng: *mut c_void) {
    if eng.is_null() {
        return;
    }
    // SAFETY: the pointer came from Box::into_raw in fib_engine_new and
    // the shim frees it once (it clears td->io_ops_data after).
    let e = unsafe { Box::from_raw(eng.cast::<Engine>()) };
    let _ = catch(|| {
        drop(e);
        Ok(())
    });
}

/// Opens a file's device (fio's `open_file`): its index, or -1 with `err`.
///
/// # Safety
/// `eng` as [`engine`]; `url` NUL-terminated; `bytes` and `block_size`
/// valid for writes; `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_open_file(
    eng: *mut c_void,
    url: *const c_char,
    bytes: *mut u64,
    block_size: *mut u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        // SAFETY: fio's file_name, NUL-terminated.
        let url = unsafe { opt_string(url, "file name") }?.ok_or("empty file name")?;
        let (idx, b, bs) = e.open_file(&url)?;
        let idx = c_int::try_from(idx).map_err(|_| "too many files".to_string())?;
        Ok((idx, b, bs))
    });
    match r {
        Ok((idx, b, bs)) => {
            // SAFETY: null-checked; the shim's locals.
            unsafe {
                if !bytes.is_null() {
                    *bytes = b;
                }
                if !block_size.is_null() {
                    *block_size = bs;
                }
            }
            idx
        }
        Err(e) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &e) };
            -1
        }
    }
}

/// Closes a file's device (fio's `close_file`).
///
/// # Safety
/// `eng` as [`engine`].
#[no_mangle]
pub unsafe extern "C" fn fib_close_file(eng: *mut c_void, file: c_int) {
    let _ = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        if let Ok(f) = usize::try_from(file) {
            e.close_file(f);
        }
        Ok(())
    });
}

/// Stages one io_u (fio's `queue`): 0, -EBUSY (no room), or -errno with
/// the reason in `err`. `op`: 0 read, 1 write, 2 flush, 3 trim.
///
/// # Safety
/// `eng` as [`engine`]; `buf` is the io_u's buffer, valid for `len` bytes
/// (reads and writes) until the io_u comes back from [`fib_event`]; `err`
/// valid for `errlen` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fib_queue(
    eng: *mut c_void,
    file: c_int,
    op: c_int,
    offset: u64,
    buf: *mut c_void,
    len: u64,
    tag: *mut c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        let op = match op {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            3 => Op::Trim,
            other => return Err(format!("unknown operation {other}")),
        };
        let file = usize::try_from(file).map_err(|_| format!("bad file index {file}"))?;
        let len = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit"))?;
        let data = if op == Op::Write {
            if buf.is_null() {
                return Err("write without a buffer".into());
            }
            // SAFETY: fio's io_u buffer holds xfer_buflen (= len) bytes
            // and fio does not touch it while queue runs; we copy it now.
            Some(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) })
        } else {
            None
        };
        if op == Op::Read && buf.is_null() {
            return Err("read without a buffer".into());
        }
        Ok(e.queue(file, op, offset, len, data, tag as usize, buf as usize))
    });
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(QueueError::Busy)) => -errno::EBUSY,
        Ok(Err(QueueError::Invalid(m))) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &m) };
            -errno::EINVAL
        }
        Err(m) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &m) };
            -errno::EIO
        }
    }
}

/// Submits the staged io_us (fio's `commit`): 0, or -EIO with `err`.
///
/// # Safety
/// `eng` as [`engine`]; `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_commit(eng: *mut c_void, err: *mut c_char, errlen: usize) -> c_int {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        e.commit();
        Ok(())
    });
    match r {
        Ok(()) => 0,
        Err(m) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &m) };
            -errno::EIO
        }
    }
}

/// Waits for at least `min` completions (fio's `getevents`); the count
/// (at most `max`), or -1 with `err`. `timeout_ns` < 0: no limit.
///
/// # Safety
/// `eng` as [`engine`]; `err` valid for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn fib_getevents(
    eng: *mut c_void,
    min: c_uint,
    max: c_uint,
    timeout_ns: i64,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        let timeout = u64::try_from(timeout_ns).ok().map(Duration::from_nanos);
        let n = e.getevents(min as usize, max as usize, timeout);
        c_int::try_from(n).map_err(|_| "too many events".to_string())
    });
    match r {
        Ok(n) => n,
        Err(m) => {
            // SAFETY: the caller's buffer.
            unsafe { set_err(err, errlen, &m) };
            -1
        }
    }
}

/// The `idx`th completed io_u of the last getevents (fio's `event`), its
/// read data copied into its buffer and its errno in `error`; null if
/// there is none.
///
/// # Safety
/// `eng` as [`engine`]; `error` valid for a write. The read buffers given
/// to [`fib_queue`] for the io_us in flight are still valid (fio keeps an
/// io_u's buffer until the engine hands the io_u back).
#[no_mangle]
pub unsafe extern "C" fn fib_event(
    eng: *mut c_void,
    idx: c_uint,
    error: *mut c_int,
) -> *mut c_void {
    let r = catch(|| {
        // SAFETY: forwarded from the caller.
        let e = unsafe { engine(eng) }?;
        let Some(d) = e.take_event(idx as usize) else {
            return Ok((std::ptr::null_mut(), 0));
        };
        if let Some(data) = d.data {
            // SAFETY: `dst` is the io_u buffer passed to fib_queue for this
            // read, valid for the read's length (= data.len(), the engine
            // truncates to it) and not used by fio until this returns.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), d.dst as *mut u8, data.len());
            }
            e.recycle(data);
        }
        Ok((d.tag as *mut c_void, d.error))
    });
    let (io_u, e) = r.unwrap_or((std::ptr::null_mut(), errno::EIO));
    if !error.is_null() {
        // SAFETY: non-null, the shim's local int.
        unsafe { *error = e };
    }
    io_u
}
