"""The course's own tooling, not part of the library: what runs, checks and publishes the course.

``cli`` (the ``labkit`` command and ``python -m labkit``), ``notebooks`` (run notebooks with
papermill, smoke or full), ``book`` (stage and build the Jupyter Book; it reads the repository
checkout, the one part of labkit that does), ``exercises`` (write starter notebooks from the
solved exercises), ``checks`` (the exercise check cells' helper: passed, failed with a hint,
or not answered yet), ``classroom`` (nbgrader metadata for the exercises), ``grade`` (``labkit
grade``: score students' notebooks), run by ``grade_worker`` inside ``sandbox`` (isolation and
limits), ``demo`` (``labkit demo``), ``chargpt`` (the character-level GPT recipe behind
``labkit train char-gpt``) and ``bpegpt`` (the same recipe on byte-level BPE tokens,
``labkit train bpe-gpt``). Import from the module, e.g.
``from labkit.course.chargpt import CharGPTSettings``; nothing is re-exported here, so that
``import labkit.course.cli`` stays quick and the library never pulls in the course's tools.
"""
