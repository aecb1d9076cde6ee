"""A small writer of DICOM VL Whole Slide Microscopy Image series, for tests (pydicom).

``write_dicom_wsi(folder, rgb, um_per_px)`` writes one instance file per pyramid level
(``level0.dcm`` the full resolution, ImageType ORIGINAL\\PRIMARY\\VOLUME\\NONE; the halvings
DERIVED\\PRIMARY\\VOLUME\\RESAMPLED), tiled TILED_FULL, each tile a JPEG baseline frame
(encapsulated) or raw RGB. All instances share the study, series, frame of reference and
container, as libdicom and OpenSlide require to assemble them into one slide.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from drivers.slide_image import BACKGROUND, WSI_SOP_CLASS, pyramid_levels

BASE_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
RESAMPLED_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
JPEG_QUALITY = 90


def write_dicom_wsi(folder: Path, rgb: np.ndarray, um_per_px: float, *, tile: int = 256,
                    jpeg: bool = True, min_level_side: int = 512) -> list[Path]:
    """Write ``rgb`` (uint8 ``(H, W, 3)``) at ``um_per_px`` as a DICOM WSI series in ``folder``;
    returns the instance files, full resolution first."""
    folder.mkdir(parents=True, exist_ok=True)
    shared = _series_uids()
    paths = []
    for i, level in enumerate(pyramid_levels(rgb, min_level_side)):
        downsample = rgb.shape[1] / level.shape[1]
        ds = _instance(level, um_per_px * downsample, tile, jpeg, shared,
                       BASE_TYPE if i == 0 else RESAMPLED_TYPE, i + 1)
        path = folder / f"level{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_associated(path: Path, rgb: np.ndarray, kind: str, um_per_px: float,
                           slide_of: Path | None = None) -> Path:
    """Write ``rgb`` as a one-instance series of its own with ImageType ...\\``kind``\\NONE
    (``LABEL`` or ``OVERVIEW``), as scanners write the label and overview photographs;
    ``slide_of``: an instance file of the slide's pyramid, whose study, frame of reference and
    container it shares (a new series all the same)."""
    uids = _series_uids()
    if slide_of is not None:
        import pydicom

        ds = pydicom.dcmread(slide_of, stop_before_pixels=True)
        uids.update({k: str(ds[k].value) for k in
                     ("StudyInstanceUID", "FrameOfReferenceUID", "ContainerIdentifier")})
    ds = _instance(rgb, um_per_px, 256, True, uids, ["ORIGINAL", "PRIMARY", kind, "NONE"], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def tiles_of(level: np.ndarray, tile: int) -> list[np.ndarray]:
    """TILED_FULL frames in row-major order; edge tiles are padded with white glass, since
    every frame of an instance has the same Rows x Columns."""
    h, w = level.shape[:2]
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            frame = np.full((tile, tile, 3), BACKGROUND, np.uint8)
            part = level[y:y + tile, x:x + tile]
            frame[:part.shape[0], :part.shape[1]] = part
            frames.append(frame)
    return frames


def _series_uids() -> dict[str, str]:
    return {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
            "FrameOfReferenceUID": generate_uid(), "DimensionOrganizationUID": generate_uid(),
            "ContainerIdentifier": f"BM-{generate_uid()[-6:]}"}


def _jpeg(frame: np.ndarray) -> bytes:
    # YBR_FULL_422 promises 4:2:2 chroma subsampling; OpenCV's default would be 4:2:0.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG tile")
    return buf.tobytes()


def _instance(level: np.ndarray, um_per_px: float, tile: int, jpeg: bool, uids: dict[str, str],
              image_type: list[str], number: int) -> Dataset:
    h, w = level.shape[:2]
    frames = tiles_of(level, tile)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    now = datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
    ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
    ds.ContainerIdentifier = uids["ContainerIdentifier"]
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    ds.SpecimenDescriptionSequence = Sequence([_specimen(uids["ContainerIdentifier"])])
    ds.Modality, ds.Manufacturer = "SM", "marrowcount tests"
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "dicom_wsi", "0", "1"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Slide", "T0", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.ImageType = image_type
    ds.BurnedInAnnotation = ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.DimensionOrganizationType = "TILED_FULL"
    org = Dataset()
    org.DimensionOrganizationUID = uids["DimensionOrganizationUID"]
    ds.DimensionOrganizationSequence = Sequence([org])

    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile, tile, len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    mm = um_per_px / 1000.0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mm, h * mm
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(mm, image_type)])
    ds.OpticalPathSequence = Sequence([_optical_path()])
    if jpeg:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        encoded = [_jpeg(f) for f in frames]
        ratio = sum(f.nbytes for f in frames) / sum(map(len, encoded))
        ds.LossyImageCompressionRatio = f"{ratio:.2f}"
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
    else:
        ds.LossyImageCompression = "00"
        ds.PixelData = np.stack(frames).tobytes()
        ds["PixelData"].VR = "OB"
    return ds


def _shared_groups(mm_per_px: float, image_type: list[str]) -> Dataset:
    measures = Dataset()
    measures.PixelSpacing = [mm_per_px, mm_per_px]  # row spacing, column spacing (mm)
    measures.SliceThickness = 0.001
    frame_type = Dataset()
    frame_type.FrameType = image_type
    groups = Dataset()
    groups.PixelMeasuresSequence = Sequence([measures])
    groups.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    return groups


def _optical_path() -> Dataset:
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    brightfield = _code("111744", "DCM", "Brightfield illumination")
    path.IlluminationTypeCodeSequence = Sequence([brightfield])
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    return path


def _specimen(container: str) -> Dataset:
    spec = Dataset()
    spec.SpecimenIdentifier = container
    spec.SpecimenUID = generate_uid()
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence()
    spec.SpecimenPreparationSequence = Sequence()
    return spec


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code
