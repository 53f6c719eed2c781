"""Identity nodes: what to do with an identity once Analyze Faces made it (Mix Identities),
and identity files (Save Identity, Load Identity) so a person is analysed once and reused.

Thin: the blend is `portraitbooth_core.face.mix_identities`, the file format
`portraitbooth_core.face.identity_file`. Identity files live in the registered models
folder `portraitbooth_identities` (models/portraitbooth_identities/, or the folders
extra_model_paths.yaml names for it); Save Identity writes to the first of them.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from portraitbooth_core.face import describe_identity_file, load_identity, mix_identities, save_identity
from portraitbooth_core.face.identity_file import EXTENSION, IdentityFileError, identity_file_name
from portraitbooth_core.paths import inside

from .base import CheckedNode
from .contracts import FaceEmbedding
from .paths import checked_choice, checked_model_path, checked_name

CATEGORY = "PortraitBooth/face"
FOLDER = "portraitbooth_identities"

# A dict update, cheap at import time: the loader's list (and extra_model_paths.yaml entries)
# work before any node runs. Listed files are identity files only.
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
if isinstance(folder_paths.folder_names_and_paths[FOLDER][1], set):
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)


class MixIdentities(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothMixIdentities",
            display_name="Mix Identities (PortraitBooth)",
            category=CATEGORY,
            description="Blend two face identities: weight 0 gives A, 1 gives B.",
            inputs=[
                FaceEmbedding.Input("identity_a", tooltip="First identity (from Analyze Faces)."),
                FaceEmbedding.Input("identity_b", tooltip="Second identity; same FaceEncoder as A."),
                io.Float.Input("weight", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of identity B in the blend."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding")],
        )

    @classmethod
    def execute(cls, identity_a, identity_b, weight) -> io.NodeOutput:
        return io.NodeOutput(mix_identities(identity_a, identity_b, weight))


def _save_target(identity_name: str) -> str:
    """Where Save Identity writes `identity_name`: one plain name inside the first folder."""
    name = checked_name(identity_name, "identity_name")
    stem = name[: -len(EXTENSION)] if name.endswith(EXTENSION) else name
    checked_name(stem, "identity_name")  # ".safetensors" alone would make a hidden file
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    # inside(): a symlink already lying under this name must not lead the write elsewhere;
    # checked_model_path(): nor may a linked identities folder, unless into an allowed root
    target = inside(folder, identity_file_name(stem), "identity_name")
    return str(checked_model_path(target, "identity_name", identity_file_name(stem)))


class SaveIdentity(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        return io.Schema(
            node_id="PortraitBoothSaveIdentity",
            display_name="Save Identity (PortraitBooth)",
            category=CATEGORY,
            description="Saves a face identity (embedding, recognizer, photo names, outlier report) as a "
                        ".safetensors file for Load Identity, so the photos are analysed once.",
            inputs=[
                FaceEmbedding.Input("face_embedding", tooltip="The identity to save (from Analyze Faces or Mix "
                                                              "Identities)."),
                io.String.Input("identity_name", default="my_identity",
                                tooltip=f"File name in {folder} (.safetensors is added); a plain name, no folders."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: a file holding another "
                                         "identity stops the node (the same identity again is fine)."),
                io.Boolean.Input("per_photo_embeddings", default=True,
                                 tooltip="Also store each photo's embedding (needed to mix or re-check photos "
                                         "later). Off: only the combined identity is stored."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding"),
                     io.String.Output(display_name="saved_path")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, identity_name="", **_kwargs):
        # Re-run when the file changes or disappears, so a deleted file is written again.
        try:
            stat = os.stat(_save_target(identity_name))
        except (OSError, ValueError):
            return ("missing", str(identity_name)[:300])
        return (stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, face_embedding, identity_name, overwrite, per_photo_embeddings) -> io.NodeOutput:
        target = _save_target(identity_name)
        try:
            path, written = save_identity(target, face_embedding, per_photo_embeddings=per_photo_embeddings,
                                          overwrite=overwrite)
        except IdentityFileError as exc:
            raise IdentityFileError(f"identity_name: {exc}") from None
        text = f"{'saved' if written else 'unchanged (already saved)'}: {path}"
        print(f"[PortraitBooth] Save Identity {text}", flush=True)
        return io.NodeOutput(face_embedding, str(path), ui={"text": [text]})


class LoadIdentity(CheckedNode):
    FILE_COMBOS = {"identity_name": (FOLDER, "identity .safetensors (written by Save Identity)")}

    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        return io.Schema(
            node_id="PortraitBoothLoadIdentity",
            display_name="Load Identity (PortraitBooth)",
            category=CATEGORY,
            description="Loads a face identity saved by Save Identity; use it wherever Analyze Faces' "
                        "face_embedding goes.",
            inputs=[
                io.Combo.Input("identity_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip=f"Identity file from {folders}."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding"), io.String.Output(display_name="info")],
        )

    @classmethod
    def fingerprint_inputs(cls, identity_name="", **_kwargs):
        # A file overwritten under the same name must not be served from the cache.
        if identity_name not in folder_paths.get_filename_list(FOLDER):
            return str(identity_name)[:300]  # never turned into a path; execute refuses it
        path = folder_paths.get_full_path(FOLDER, identity_name)
        try:
            stat = os.stat(path)
        except (OSError, TypeError):
            return ("missing", identity_name)
        return (identity_name, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, identity_name) -> io.NodeOutput:
        name = checked_choice(identity_name, folder_paths.get_filename_list(FOLDER), "identity_name")
        path = folder_paths.get_full_path(FOLDER, name)
        if path is None:
            folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
            raise FileNotFoundError(f"identity_name: {name!r} is no longer in {folders}; refresh and pick again.")
        checked_model_path(path, "identity_name", name)  # listed, but a link out of the allowed roots is refused
        try:
            identity = load_identity(path)
            info = describe_identity_file(path)
        except IdentityFileError as exc:
            raise IdentityFileError(f"identity_name: {exc}") from None
        return io.NodeOutput(identity, info)


NODES = [MixIdentities, SaveIdentity, LoadIdentity]
