"""FlashPortrait Batch: long portrait animation on Ray workers, orchestrated by Prefect.

The sub-packages map to the top-level folders of the repository: ``flashportrait.model`` (``model/``),
``flashportrait.actors`` (``actors/``), ``flashportrait.flows`` (``flows/``), ``flashportrait.infra`` (``infra/``).
"""

__version__ = "0.1.0"
