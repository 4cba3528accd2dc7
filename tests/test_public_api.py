import types

import meshfed
import meshfed.errors
import meshfed.gateway
import meshfed.trust


def test_all_lists_exactly_the_public_names():
    for module in (meshfed, meshfed.errors, meshfed.gateway, meshfed.trust):
        public = {name for name in vars(module) if not name.startswith("_") and not _is_submodule(module, name)}
        public |= {"__version__"} & set(vars(module))
        assert set(module.__all__) == public - {"annotations"}, module.__name__


def _is_submodule(module: types.ModuleType, name: str) -> bool:
    return isinstance(getattr(module, name), types.ModuleType)


def test_every_error_is_a_meshfed_error():
    for name in meshfed.errors.__all__:
        assert issubclass(getattr(meshfed.errors, name), meshfed.errors.MeshfedError)
