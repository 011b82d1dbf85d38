"""The one face finder: detection, landmarks, masks and orientation, shared by the dataset tools,
post-processing, training and evaluation.

    from library.faces import FaceAnalyzer, detect_face_landmarks, quiet_native_stderr

    with quiet_native_stderr(), FaceAnalyzer() as analyzer:   # one per run
        found = analyzer.analyze(rgb)          # FaceAnalysis: chosen face, 5 landmarks, face mask, rotation
    points = detect_face_landmarks(rgb)        # [[5, 2] float32, ...] in ArcFace order, surest first

Modules: analyzer.py (detectors + face mesh, which face, orientation), finder.py (landmarks only, on a
shared analyzer; the stderr quieting), geometry.py (landmarks from the mesh or the detector, order,
quarter turns), masks.py (face-oval, ellipse and parsed masks), bisenet.py (the optional face parser).
"""

from library.faces.analyzer import DetectedFace, FaceAnalysis, FaceAnalyzer, square_crop
from library.faces.finder import detect_face_landmarks, quiet_native_stderr

__all__ = ["DetectedFace", "FaceAnalysis", "FaceAnalyzer", "detect_face_landmarks", "quiet_native_stderr",
           "square_crop"]
