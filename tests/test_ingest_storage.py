"""Storage details that need no network: the File Meta Information we write, and its parse."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from service.ingest.storage import part10_file


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.840.113619.2.55.3.604688119.968.1268734544.417"])
def test_part10_file_meta_equals_pydicom_encoding(sop_instance_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta)
    ours = part10_file(
        b"",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop_instance_uid,
        transfer_syntax_uid="1.2.840.10008.1.2.4.90",
    )
    assert ours == b"\x00" * 128 + b"DICM" + buffer.getvalue()
    parsed = dcmread(BytesIO(ours + b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"))
    assert parsed.file_meta.MediaStorageSOPInstanceUID == sop_instance_uid
    assert parsed.SOPInstanceUID == "1.2.3.4"
