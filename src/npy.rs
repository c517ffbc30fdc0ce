//! Minimal writer for NumPy's `.npy` format (version 1.0, little-endian f32, C order), so that
//! tensors and hidden states can be read with `numpy.load`.

use std::io::{self, Write};

/// Write `data` with numpy shape `shape` (C order) as an `.npy` stream.
pub fn write_f32<W: Write>(w: &mut W, shape: &[usize], data: &[f32]) -> io::Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("npy: shape {shape:?} holds {n} values, got {}", data.len()),
        ));
    }
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut buf = Vec::with_capacity(data.len().min(1 << 16) * 4);
    for chunk in data.chunks(1 << 16) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_data_follows() {
        let mut out = Vec::new();
        write_f32(&mut out, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(&out[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([out[8], out[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&out[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"));
        assert_eq!(out.len(), 10 + hlen + 24);
        assert_eq!(&out[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
        assert!(write_f32(&mut Vec::new(), &[4], &[1.0]).is_err());
    }
}
