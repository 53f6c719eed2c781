"""DIP, dynamic identity preservation (PortraitBooth §3.2; training only).

  estimate       `sigma_at`, `noised_latent`, `eps_from_denoised`, `denoised_from_eps`: the
                 one noising and one-step denoised-estimate formula (ComfyUI's sigma space)
                 that training, validation and the evidence run use
  identity_loss  `identity_loss` (1 - cos), `dip_identity_loss` (decode the estimate, crop
                 the face by its landmarks, recognize, compare), `face_windows`
The differentiable recognizer itself is face analysis: `portraitbooth_core.face.arcface_torch`.
"""
