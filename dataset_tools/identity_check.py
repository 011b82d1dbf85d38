"""The source set's identity check: does every photo show the same person, and which face is theirs?

`prepare source` embeds every face it found in each photo with the identity network
(`library.evaluation.face_identity`: dlib's ResNet v1, or ArcFace with `--identity-weights`), at the
landmarks it found (no second detector run). Then, for the set as a whole:

- **Which face.** In a photo with several faces, the face used is the one most like the rest of the set:
  highest cosine similarity to the element-wise median of the other photos' embeddings (the photos with
  one face each when there are any, as they are unambiguous), not the largest.
- **Different person.** Each photo's chosen face is compared with the median embedding of the *other*
  photos (leave-one-out, so an odd photo does not pull the median towards itself). The identity distance
  is 1 - cosine similarity; a photo whose distance is over 1 - the network's same-person threshold
  (dlib: 0.085, i.e. cosine 0.915, dlib's own euclidean 0.6 rule on typical descriptors; ArcFace: 0.7)
  "looks like a different person". Measured with dlib on the demo's astronaut variants: 0.00 to 0.02;
  other people against an astronaut set: 0.11 to 0.18.

With fewer than 3 photos the set has no majority to compare with: the check is skipped and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from library.faces.geometry import landmarks_from_detector, landmarks_from_mesh

MIN_PHOTOS = 3


@dataclass
class Verdict:
    """The identity check's answer for one photo."""

    index: int  # the face to use, an index into that photo's faces (0: the one prepare chose)
    distance: float  # 1 - cosine similarity to the median of the other photos
    different: bool  # distance over the network's threshold
    messages: list[str] = field(default_factory=list)


def face_landmarks(face, chosen_landmarks: np.ndarray | None) -> np.ndarray:
    """ArcFace-order landmarks of a `library.faces.analyzer.DetectedFace`: the analysis' own for the chosen
    face, the mesh's when it was fitted, else the detector keypoints'."""
    if chosen_landmarks is not None:
        return chosen_landmarks
    if face.mesh is not None:
        return landmarks_from_mesh(face.mesh)
    return landmarks_from_detector(face.keypoints)


def embed_faces(network, rgb: np.ndarray, faces: list, chosen_landmarks: np.ndarray | None) -> list[np.ndarray]:
    """[d] L2-normalised embedding of each face in `faces` (index 0: the chosen one, at
    `chosen_landmarks`), from `network` (an `IdentityNetwork`) at their landmarks."""
    return [network.embed(rgb, face_landmarks(f, chosen_landmarks if i == 0 else None)).embedding
            for i, f in enumerate(faces)]


def _median_unit(vectors: list[np.ndarray]) -> np.ndarray:
    m = np.median(np.stack(vectors), axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def check_set(network, photos: list[list[np.ndarray]]) -> list[Verdict] | None:
    """Verdicts for a set: `photos[i]` holds the embeddings of photo i's faces (index 0: prepare's choice,
    the largest confirmed face). None when fewer than MIN_PHOTOS photos have a face."""
    n = len(photos)
    if n < MIN_PHOTOS:
        return None
    singles = {i for i, faces in enumerate(photos) if len(faces) == 1}
    chosen: list[int] = []
    for i, faces in enumerate(photos):
        if len(faces) == 1:
            chosen.append(0)
            continue
        others = [j for j in range(n) if j != i]
        anchors = [photos[j][0] for j in others if j in singles] or [photos[j][0] for j in others]
        ref = _median_unit(anchors)
        chosen.append(int(np.argmax([network.similarity(e, ref) for e in faces])))
    embeddings = [photos[i][k] for i, k in enumerate(chosen)]
    limit = 1.0 - network.threshold
    verdicts = []
    for i in range(n):
        ref = _median_unit([e for j, e in enumerate(embeddings) if j != i])
        distance = 1.0 - network.similarity(embeddings[i], ref)
        different = not network.same_person(embeddings[i], ref)
        messages = []
        if different:
            messages.append(f"looks like a different person: identity distance {distance:.3f} from the other photos' "
                            f"median face (1 - cosine, {network.name}; the same person is under {limit:.3f}); "
                            "remove it unless it is the person")
        verdicts.append(Verdict(index=chosen[i], distance=distance, different=different, messages=messages))
    return verdicts
