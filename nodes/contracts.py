"""Socket types the pack's nodes pass between each other."""
from comfy_api.latest import io

FaceEncoder = io.Custom("PB_FACE_ENCODER")   # portraitbooth_core.face.FaceEncoder
FaceEmbedding = io.Custom("PB_FACE_EMBEDDING")  # portraitbooth_core.face.Identity
Projector = io.Custom("PB_STEA_PROJECTOR")  # portraitbooth_core.weights.file.PortraitBoothModel
