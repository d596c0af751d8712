//! Appending PDUs to the send buffer: data written in place, or LUN data
//! lent by reference and spliced in after the header.

use super::*;

/// Appends one PDU whose data segment (`len` bytes) is written in place by
/// `fill`, so LUN data goes straight into the send buffer.
pub(super) fn push_pdu_with(
    out: &mut Vec<u8>,
    header: &PduHeader,
    len: usize,
    digests: Digests,
    fill: impl FnOnce(&mut [u8]),
) {
    let start = out.len();
    out.extend_from_slice(&header.emit(0, len as u32));
    if digests.header {
        let d = digest(&out[start..]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    if len > 0 {
        let data_start = out.len();
        out.resize(data_start + len + pad_len(len), 0);
        fill(&mut out[data_start..data_start + len]);
        if digests.data {
            let d = digest(&out[data_start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

/// Appends one PDU whose data segment is `len` bytes of `lun` at byte
/// `offset`, lent by reference (`refs`, spliced in after the header)
/// instead of copied; the data digest is taken over the lent bytes in
/// place. Returns the bytes lent (`len`).
pub(super) fn push_pdu_by_reference(
    out: &mut Vec<u8>,
    refs: &mut Vec<OutRef>,
    header: &PduHeader,
    lun: &crate::target::Lun,
    offset: u64,
    len: usize,
    digests: Digests,
) -> usize {
    let start = out.len();
    out.extend_from_slice(&header.emit(0, len as u32));
    if digests.header {
        let d = digest(&out[start..]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    if len == 0 {
        return 0;
    }
    let mut crc = 0u32;
    lun.read_shared(offset, len, |buf, from, n| {
        if digests.data {
            crc = crc32c::crc32c_append(crc, &buf[from..from + n]);
        }
        refs.push(OutRef {
            at: out.len(),
            buf: Arc::clone(buf),
            start: from,
            len: n,
        });
    });
    let pad = [0u8; 3];
    let pad = &pad[..pad_len(len)];
    out.extend_from_slice(pad);
    if digests.data {
        let d = crc32c::crc32c_append(crc, pad);
        out.extend_from_slice(&d.to_le_bytes());
    }
    len
}
