"""A small procedurally drawn world (captioned scenes with exact masks) on which the method can be seen
to work: see :mod:`testkit.toyworld.scenes` (drawing), :mod:`testkit.toyworld.sampling` (random scenes
and MagiCapture's three sets) and :mod:`testkit.toyworld.sets` (prepared folders the trainer reads)."""
