"""steerheal: steer, heal, repeat.

Stages (one module each): :mod:`.vector` (01), :mod:`.generate` (02), :mod:`.filter` (03),
:mod:`.heal` (04), :mod:`.evaluate` (05); :mod:`.config`, :mod:`.models`, :mod:`.runfolder`,
:mod:`.driver` and :mod:`.report` hold what the stages share.
"""

__version__ = "0.1.0"
