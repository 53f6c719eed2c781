"""The evidence run's synthetic world (evaluation/evidence/world.py): the parts the
effect measurements rest on. The hand-set VAE must be an exact pooling autoencoder
through ComfyUI's own TAESD class, or decoded one-step estimates (DIP's metric) mean
nothing; the recognizer must tell the identities apart, or no identity metric does."""
from __future__ import annotations

import numpy as np
import torch


def test_pooling_vae_encodes_8x_means_and_decodes_them_back():
    import comfy.taesd.taesd as taesd

    from evaluation.evidence import world

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

    from evaluation.evidence import dataset, world

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
    from evaluation.evidence import dataset, world

    recognizer = dataset.Recognizer(world.build_recognizer_onnx(tmp_path / "rec.onnx"))
    samples = dataset.make_samples(world.make_identities(4, 0), 8, 64, 1, recognizer)
    drawn = dataset.uninformative_embeddings(samples, 3)
    owner = {s.embedding.tobytes(): s.identity for s in samples}
    # Per identity, the embeddings given come from several identities (a fixed
    # permutation of identities would still name each one).
    for k in range(4):
        given = {owner[d.tobytes()] for d, s in zip(drawn, samples) if s.identity == k}
        assert len(given) > 1
