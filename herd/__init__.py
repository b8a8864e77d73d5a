"""herd: the CLI and the embedded local servers."""

# torch.compile's C++ builder imports setuptools, whose distutils shim refuses to run once the stdlib
# distutils is loaded (some dependencies load it); importing setuptools first installs the shim so
# compiling works in any process that later imports those dependencies.
import setuptools  # noqa: F401
