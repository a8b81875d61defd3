"""The stage abstraction (:mod:`.base`) and the layer model stages run on (:mod:`.model`).

The registry of stage names is :mod:`mmcurate.pipelines.registry`, a floor above the stage packages it names.
"""
