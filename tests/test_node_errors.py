"""Errors and reports in node words: which input, what was wrong, what to do (issue 15)."""
from __future__ import annotations

import pytest
import torch

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo
from portraitbooth_core.face import uint8_to_comfy


def _ecac_inputs(face_mask) -> dict:
    return dict(model=None, clip=None, text="a photo of a smiling man", identity_words="man", strength=1.0,
                start_percent=0.0, end_percent=0.6, beta=0.8, gamma=0.1, layers="16x16 layers (recommended)",
                capture_maps=True, face_mask=face_mask)


def test_ecac_refuses_an_empty_face_mask_like_the_region_sampler(pack_nodes):
    node = pack_nodes["PortraitBoothECACPatch"]
    layers = next(spec for spec in node.define_schema().inputs if spec.id == "layers").options[0]
    with pytest.raises(ValueError, match=r"^face_mask is empty \(all zero\): paint where the face is, or leave "
                                         r"face_mask unconnected"):
        node.execute(**(_ecac_inputs(torch.zeros(1, 64, 64)) | {"layers": layers}))
    faint = torch.zeros(1, 64, 64)
    faint[0, 3, 3] = 0.0004
    with pytest.raises(ValueError, match=r"^face_mask is nearly empty \(max 0.0004\)"):
        node.execute(**(_ecac_inputs(faint) | {"layers": layers}))
    with pytest.raises(ValueError, match=r"^layers: 'everything' is not one of the choices"):
        node.execute(**(_ecac_inputs(None) | {"layers": "everything"}))


def test_a_nearly_empty_region_mask_is_not_called_all_zero():
    from portraitbooth_core.regions.layout import RegionError, fit_mask

    faint = torch.zeros(64, 64)
    faint[5, 5] = 0.0004
    with pytest.raises(RegionError, match=r"^region 1's mask is nearly empty \(max 0.0004\): paint"):
        fit_mask(faint, 8, 8, "region 1's mask")
    with pytest.raises(RegionError, match=r"^region 1's mask is empty \(all zero\)"):
        fit_mask(torch.zeros(64, 64), 8, 8, "region 1's mask")


def test_identity_score_reports_the_recognizers_threshold_and_a_verdict(pack_nodes, zero_download_encoder,
                                                                       photos_dir):
    analyze, score = pack_nodes["PortraitBoothAnalyzeFaces"], pack_nodes["PortraitBoothIdentityScore"]
    obama = analyze.execute(face_encoder=zero_download_encoder, images=uint8_to_comfy([read_photo(photos_dir,
                            "obama.jpg")]), select="largest", face_index=0, on_no_face="error",
                            det_threshold=0.6).result[0]
    reports = [score.execute(face_encoder=zero_download_encoder, reference=obama,
                             images=uint8_to_comfy([read_photo(photos_dir, name)]), sort=True,
                             det_threshold=0.6).result[3] for name in ("obama2.jpg", "biden.jpg")]
    same, other = (r.splitlines() for r in reports)
    assert same[1].startswith("image 0: score 0.9") and same[1].endswith("-> same person"), reports
    # dlib scores two different people about 0.8: the verdict, not the bare number, says "different"
    assert other[1].startswith("image 0: score 0.8") and other[1].endswith("-> not the same person"), reports
    assert same[-1].startswith("same person when cos >= 0.90 (dlib documents L2 0.6"), reports
