"""Decompression bombs (issue 24), generated in a second or so without holding their decoded size.

Each is a small file whose header declares a huge decoded size. Deflate streams of zeros are built
from one compressed block repeated: a block that ends with a full flush refers to nothing before
it, so copies of it can be concatenated into one valid stream, which costs a few milliseconds per
copy instead of compressing gigabytes.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np

_BLOCK = 1 << 24  # 16 MiB of zeros per repeated compressed block


def _zero_blocks(n_bytes: int, level: int = 9) -> tuple[list[bytes], int]:
    """Raw-deflate blocks (no final block) decoding to ``n_bytes`` zeros; and the CRC-32 of them."""
    full, rest = divmod(n_bytes, _BLOCK)
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    block = c.compress(bytes(_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    crc_block = zlib.crc32(bytes(_BLOCK))
    blocks, crc = [block] * full, 0
    for _ in range(full):
        crc = _crc_combine(crc, crc_block, _BLOCK)
    if rest:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        blocks.append(c.compress(bytes(rest)) + c.flush(zlib.Z_FULL_FLUSH))
        crc = zlib.crc32(bytes(rest), crc)
    return blocks, crc


def _crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine (CRC of A+B from the CRCs of A and B), which Python does not expose."""
    def times(mat, vec):
        s, i = 0, 0
        while vec:
            if vec & 1:
                s ^= mat[i]
            vec >>= 1
            i += 1
        return s

    def square(mat):
        return [times(mat, mat[n]) for n in range(32)]

    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = square(odd)
    odd = square(even)
    while True:
        even = square(odd)
        if len2 & 1:
            crc1 = times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = square(even)
        if len2 & 1:
            crc1 = times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def _raw_deflate(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix`` then ``zeros`` zero bytes; and its CRC-32."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    blocks, crc_zeros = _zero_blocks(zeros)
    crc = _crc_combine(zlib.crc32(prefix), crc_zeros, zeros) if zeros else zlib.crc32(prefix)
    return head + b"".join(blocks) + b"\x03\x00", crc  # 03 00: an empty final block


def png16(path, width: int = 10000, height: int = 10000) -> Path:
    """A 16-bit greyscale PNG (about 194 KB at 10000x10000): black, with one white pixel."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(2 * width)  # filter byte "none", then the samples
    first = b"\x00\xff\xff" + bytes(2 * width - 2)  # so that min < max
    c = zlib.compressobj(9)
    parts = [c.compress(first)]
    parts += [c.compress(row) for _ in range(height - 1)]
    parts.append(c.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    p = Path(path)
    p.write_bytes(data)
    return p


def deflated_dicom(path, rows: int = 8192, columns: int = 8192, frames: int = 16,
                   pixel_bytes: int | None = None, padding: int = 0) -> Path:
    """A Deflated Explicit VR Little Endian DICOM (1.2.840.10008.1.2.1.99) of 16-bit zero frames.

    The dataset is written by pydicom; the pixel data element (``rows*columns*frames*2`` bytes,
    2 GiB by default, or ``pixel_bytes``: a header that lies) is appended and deflated block by
    block, so it never exists in memory. ``padding`` bytes of a private element come before the
    image attributes (a header too long to read the attributes from its first MiB).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "BOMB", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if padding:
        ds.add_new(0x00090010, "LO", "CBR TEST")
        ds.add_new(0x00091000, "OB", bytes(padding))
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * columns * frames * 2 if pixel_bytes is None else pixel_bytes
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)
    stream, _ = _raw_deflate(body.getvalue() + pixel_header, n)
    p = Path(path)
    p.write_bytes(head.getvalue() + stream)
    return p


def nifti_header_only(path, shape=(8, 8, 50_000_000), version: int = 2) -> Path:
    """A NIfTI header (NIfTI-2 by default, 644 bytes) declaring ``shape`` uint8 voxels, with no data."""
    import nibabel as nib

    hdr = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_data_offset(len(hdr.binaryblock) + 4)
    p = Path(path)
    p.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 100)
    return p


def nifti_gz(path, shape=(1024, 1024, 1024)) -> Path:
    """A gzipped NIfTI-1 volume of uint8 zeros (about 1 MB for 1024^3 = 1 GiB decoded)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_data_offset(352)
    prefix = hdr.binaryblock + b"\x00" * 4
    n = int(np.prod(shape))
    stream, crc = _raw_deflate(prefix, n)
    gz_header = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x02\xff"
    p = Path(path)
    p.write_bytes(gz_header + stream + struct.pack("<II", crc, (len(prefix) + n) & 0xFFFFFFFF))
    return p


def nifti(path, data, affine=None) -> Path:
    """A small NIfTI-1 file of ``data``; ``affine`` (which may hold NaN, which nibabel refuses to
    write) is patched into the header's sform afterwards."""
    import nibabel as nib

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(p))
    if affine is not None:
        gz = str(p).endswith(".gz")
        raw = bytearray(gzip.decompress(p.read_bytes()) if gz else p.read_bytes())
        raw[280:328] = np.asarray(affine[:3], dtype="<f4").tobytes()  # srow_x, srow_y, srow_z
        raw[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1: the sform rules
        p.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return p


def _npy_header(shape, dtype="|u1") -> bytes:
    """A version 1.0 ``.npy`` header for ``shape`` (no data)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue()


def npz_header_bomb(path, shape=(10**7, 1000, 1000)) -> Path:
    """An ``.npz`` (about 500 bytes) whose ``train_images.npy`` header declares ``shape`` uint8."""
    import zipfile

    labels = io.BytesIO()
    np.save(labels, np.zeros(3, dtype=np.int64))
    p = Path(path)
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", _npy_header(shape))
        z.writestr("train_labels.npy", labels.getvalue())
    return p


def npz_zip_bomb(path, n_images: int = 3500, side: int = 1000) -> Path:
    """A real ``.npz`` whose deflated ``train_images.npy`` holds ``n_images`` x side x side zeros
    (3.5 GB, about 3.4 MB compressed), with matching labels."""
    import zipfile

    header = _npy_header((n_images, side, side))
    n = n_images * side * side
    stream, crc = _raw_deflate(header, n)
    size = len(header) + n
    assert size < 0xFFFFFFFF, "keep it below the zip64 limit"
    labels = io.BytesIO()
    np.save(labels, np.zeros(n_images, dtype=np.int64))
    out = io.BytesIO()
    name = b"train_images.npy"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name), 0)
    out.write(local + name + stream)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                          len(name), 0, 0, 0, 0, 0, 0) + name
    # the labels member, written by zipfile into a second archive, then moved after the first
    tail = io.BytesIO()
    with zipfile.ZipFile(tail, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_labels.npy", labels.getvalue())
    info = zipfile.ZipFile(io.BytesIO(tail.getvalue())).infolist()[0]
    raw = tail.getvalue()
    cd_start = raw.index(b"PK\x01\x02")
    offset = out.tell()
    out.write(raw[:cd_start])  # the labels' local header and data
    cd_labels = bytearray(raw[cd_start:raw.index(b"PK\x05\x06")])
    cd_labels[42:46] = struct.pack("<I", offset + info.header_offset)
    cd_offset = out.tell()
    cd = central + bytes(cd_labels)
    out.write(cd)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 2, 2, len(cd), cd_offset, 0))
    p = Path(path)
    p.write_bytes(out.getvalue())
    return p
