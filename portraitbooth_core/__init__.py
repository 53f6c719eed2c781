"""ComfyUI-free core of PortraitBooth: pure torch/numpy code that the nodes, the training
package and the tests share. Nothing here imports ComfyUI, except weights/formats while it
converts a foreign release (ComfyUI's own key maps are the reference for what it writes).

One subpackage per feature; open the one named after what you look for:

  face/        face analysis: detect, align, embed (ArcFace ONNX, dlib, the differentiable
               torch recognizer), parse masks, build and mix identities
  stea/        STEA: the projector, the splice into the class word's slot, class-word matching
  ecac/        ECAC: attention dispatch and layers, capture, inference control, the
               localization loss, expression words, map preview
  regions/     several subjects: layouts, regional attention, MultiDiffusion fusion
  dip/         DIP: the noising and one-step denoised estimate, the identity loss
  weights/     the PortraitBooth weight file and model-family detection (the SD1.5 check);
               formats/: other projects' releases (FastComposer) imported into it
  scoring/     identity score of generated images (FastComposer's protocol)
  vocabulary   class words with their synonyms, emotion words with theirs
  optional     optional dependencies, imported when a feature needs them
  paths        the path policy: what a node or a user-supplied file may point at
"""

__version__ = "0.1.0"
