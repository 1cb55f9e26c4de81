"""The backbone registry: ``@BACKBONES.register("name")`` sits above each constructor."""

from facefuse.core.registry import Registry

BACKBONES = Registry("backbone")
