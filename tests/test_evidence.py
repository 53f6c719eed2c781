"""The small-scale evidence (evidence/): its short run (one seed, the four
Table-6 rows, ~7 minutes on two cores) must show each mechanism's effect with the
stated margin, and the run without that mechanism must not. Then the synthetic world
the measurements rest on: the hand-set VAE must be an exact pooling autoencoder through
ComfyUI's own TAESD class, or decoded one-step estimates (DIP's metric) mean nothing;
the recognizer must tell the identities apart, or no identity metric does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> dict[str, dict]:
    """Metrics of the four runs of `python -m evidence --quick` (seed 0)."""
    out = tmp_path_factory.mktemp("evidence")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own process group: on a timeout the worker processes go too, not only the parent.
    proc = subprocess.Popen([sys.executable, "-m", "evidence", "--quick", "--jobs", "2",
                             "--work", str(out / "work"), "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    print(stdout)  # the table, shown with pytest -s
    return json.loads((out / "evidence.json").read_text())["results"]["0"]


@pytest.mark.slow  # needs the evidence run (~8 min on 2 cores)
def test_stea_carries_identity_and_fails_without_it(evidence):
    from evidence import report

    assert report.stea_check(evidence["full"]).passed, report.stea_check(evidence["full"])
    assert not report.stea_check(evidence["no_stea"]).passed, report.stea_check(evidence["no_stea"])


@pytest.mark.slow  # needs the evidence run (~8 min on 2 cores)
def test_ecac_places_attention_and_fails_without_it(evidence):
    from evidence import report

    assert report.ecac_check(evidence["full"]).passed, report.ecac_check(evidence["full"])
    assert not report.ecac_check(evidence["no_ecac"]).passed, report.ecac_check(evidence["no_ecac"])
    # ...and at least one layer sits at L_loc's floors: identity ~beta and expression ~gamma
    # in the face, identity ~0 outside.
    assert report.ecac_floors_check(evidence["full"]).passed, report.ecac_floors_check(evidence["full"])
    assert not report.ecac_floors_check(evidence["no_ecac"]).passed, report.ecac_floors_check(evidence["no_ecac"])


@pytest.mark.slow  # needs the evidence run (~8 min on 2 cores)
def test_dip_raises_identity_over_the_run_without_it(evidence):
    from evidence import report

    check = report.dip_check(evidence["full"], evidence["no_dip"])
    assert check.passed, check
    # Switched off, L_id is the baseline itself: no gain, the check fails.
    assert not report.dip_check(evidence["no_dip"], evidence["no_dip"]).passed


@pytest.mark.slow  # needs the evidence run (~8 min on 2 cores)
def test_every_ablation_lowers_its_own_metric_as_in_the_paper(evidence):
    from evidence import report

    assert report.directions(evidence) == {"no_stea": True, "no_ecac": True, "no_dip": True}


def test_pooling_vae_encodes_8x_means_and_decodes_them_back():
    import comfy.taesd.taesd as taesd

    from evidence import world

    vae = taesd.TAESD()
    vae.load_state_dict(world.pooling_taesd_state_dict())
    rng = np.random.default_rng(0)
    image = torch.from_numpy(world.render(world.make_identities(1, 0)[0], "happy", 64, rng).image)
    image = image.permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latent = vae.encode(image * 2 - 1) * 0.18215            # SD1.5's latent format, as the UNet sees it
        decoded = (vae.decode(latent / 0.18215) + 1) / 2
    means = torch.nn.functional.avg_pool2d(image, 8)
    torch.testing.assert_close(latent[:, :3], world.LATENT_GAIN * (2 * means - 1), atol=1e-5, rtol=0)
    nearest = torch.nn.functional.interpolate(means, scale_factor=8)
    assert float((decoded - nearest).abs().max()) < 0.02        # the decoder's tanh clamp, nothing else


def test_recognizer_tells_identities_apart(tmp_path):
    from portraitbooth_core.face.align import align_face

    from evidence import dataset, world

    recognizer = dataset.Recognizer(world.build_recognizer_onnx(tmp_path / "rec.onnx"))
    identities = world.make_identities(8, 0)
    rng = np.random.default_rng(1)
    crops, labels = [], []
    for k, ident in enumerate(identities):
        for expression in world.EXPRESSIONS:
            r = world.render(ident, expression, 64, rng)
            crops.append(align_face(r.image, r.landmarks, 112))
            labels.append(k)
    e = recognizer(np.stack(crops))
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim, labels = e @ e.T, np.array(labels)
    same = sim[(labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)]
    other = sim[labels[:, None] != labels[None]]
    # Other renderings (place, size, background, expression) of one identity stay close;
    # every pair of identities is further apart than that.
    assert same.mean() > 0.8 and other.mean() < 0.3, (same.mean(), other.mean())
    assert same.min() > other.max() - 0.2, (same.min(), other.max())


def test_uninformative_embeddings_do_not_name_the_identity(tmp_path):
    from evidence import dataset, world

    recognizer = dataset.Recognizer(world.build_recognizer_onnx(tmp_path / "rec.onnx"))
    samples = dataset.make_samples(world.make_identities(4, 0), 8, 64, 1, recognizer)
    drawn = dataset.uninformative_embeddings(samples, 3)
    owner = {s.embedding.tobytes(): s.identity for s in samples}
    # Per identity, the embeddings given come from several identities (a fixed
    # permutation of identities would still name each one).
    for k in range(4):
        given = {owner[d.tobytes()] for d, s in zip(drawn, samples) if s.identity == k}
        assert len(given) > 1


def test_report_shows_each_row_as_mean_and_range_over_seeds():
    from evidence import report

    def metrics(margin, conc):
        return {"stea": {"margin": margin}, "ecac": {"identity_concentration": conc, "expression_mean_in_mask": 0.05,
                                                     "gamma": 0.1, "beta": 0.8, "layers": 1,
                                                     "per_layer": {"output.0.0": {"identity_core": 0.79,
                                                                                  "expression_core": 0.12,
                                                                                  "identity_outside": 0.0}}},
                "dip": {"similarity": 0.9, "clean_similarity": 0.93}}

    table = report.markdown({0: {"full": metrics(0.10, 2.0)}, 1: {"full": metrics(0.20, 3.0)}})
    assert "| full | +15.0 [+10.0, +20.0] % | 2.50 [2.00, 3.00]x | 0.050 [0.050, 0.050] (0.1) | 1.0 [1.0, 1.0] of 1 |" in table
    assert "w/o" not in table  # only the runs given
