"""Logs never quote a stored value: pydicom's complaints about values are kept, not their text."""

from __future__ import annotations

import logging
import warnings
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from imageshare.app import configure_logging
from imageshare.settings import Settings


def _file_with_a_name_where_a_number_belongs() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Doe^Jane"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00080060, "CS", "janedoe1970")  # Modality holding a name
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_value_that_does_not_fit_its_vr_is_never_quoted_in_the_log(tmp_path, caplog):
    configure_logging(Settings(data_dir=tmp_path))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        configure_logging(Settings(data_dir=tmp_path))
        ds = dcmread(BytesIO(_file_with_a_name_where_a_number_belongs()))
        _ = ds.Modality
    assert "janedoe1970" not in caplog.text
    assert not [w for w in shown if "janedoe1970" in str(w.message)]
    assert "value not logged" in caplog.text
