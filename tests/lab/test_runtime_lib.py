"""The lab's stand-in librkllmrt.so builds: right machine, RKLLM 1.2.3 API, version string, reproducible."""

import ctypes
import os
import platform
import shutil
import struct
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RUNTIME = os.path.join(ROOT, 'lab', 'runtime')
DIST = os.path.join(RUNTIME, 'dist')
VERSIONS = ('1.2.2', '1.2.3')
ARCHES = {'x86_64': 62, 'aarch64': 183}

# The C API of RKLLM 1.2.3 (include/rkllm.h at release-v1.2.3).
API_1_2_3 = {
    'rkllm_createDefaultParam', 'rkllm_init', 'rkllm_load_lora', 'rkllm_load_prompt_cache',
    'rkllm_release_prompt_cache', 'rkllm_destroy', 'rkllm_run', 'rkllm_run_async', 'rkllm_abort',
    'rkllm_is_running', 'rkllm_clear_kv_cache', 'rkllm_get_kv_cache_size', 'rkllm_set_chat_template',
    'rkllm_set_function_tools', 'rkllm_set_cross_attn_params',
}

BUILDS = [(v, a) for v in VERSIONS for a in ARCHES]


def built(version, arch):
    return os.path.join(DIST, version, arch, 'librkllmrt.so')


def read(path):
    with open(path, 'rb') as f:
        return f.read()


def elf64_header(data):
    assert data[:4] == b'\x7fELF', 'not an ELF file'
    assert data[4] == 2 and data[5] == 1, 'expected a 64-bit little-endian ELF'
    e_type, e_machine = struct.unpack_from('<HH', data, 16)
    e_shoff, = struct.unpack_from('<Q', data, 40)
    e_shentsize, e_shnum = struct.unpack_from('<HH', data, 58)
    return e_type, e_machine, e_shoff, e_shentsize, e_shnum


def dynamic_symbols(data):
    """Defined global/weak function and object symbols of .dynsym, parsed from the section headers."""
    shoff, shentsize, shnum = elf64_header(data)[2:]
    sections = []
    for i in range(shnum):
        fields = struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize)
        # sh_type, sh_offset, sh_size, sh_link, sh_entsize
        sections.append((fields[1], fields[4], fields[5], fields[6], fields[9]))
    dynsym = [s for s in sections if s[0] == 11]  # SHT_DYNSYM
    assert len(dynsym) == 1, 'expected exactly one .dynsym section'
    offset, size, link, entsize = dynsym[0][1:]
    strtab_offset = sections[link][1]
    names = {}
    for off in range(offset, offset + size, entsize):
        st_name, st_info, st_shndx = (struct.unpack_from('<IBBH', data, off)[i] for i in (0, 1, 3))
        bind, kind = st_info >> 4, st_info & 0xf
        if st_shndx == 0 or bind not in (1, 2) or kind not in (1, 2):  # undefined, local, or not FUNC/OBJECT
            continue
        end = data.index(b'\0', strtab_offset + st_name)
        names[data[strtab_offset + st_name:end].decode()] = 'FUNC' if kind == 2 else 'OBJECT'
    return names


@pytest.mark.parametrize('version,arch', BUILDS)
def test_built_library_is_a_shared_object_for_its_arch(version, arch):
    e_type, e_machine = elf64_header(read(built(version, arch)))[:2]
    assert e_type == 3, 'ET_DYN expected (shared object)'
    assert e_machine == ARCHES[arch]


@pytest.mark.parametrize('version,arch', BUILDS)
def test_built_library_exports_the_rkllm_1_2_3_api(version, arch):
    symbols = dynamic_symbols(read(built(version, arch)))
    functions = {name for name, kind in symbols.items() if kind == 'FUNC'}
    assert API_1_2_3 <= functions, 'missing: %s' % sorted(API_1_2_3 - functions)
    # nothing but the API and the version banner leaks out
    assert set(symbols) - API_1_2_3 == {'rkllm_lab_version_banner'}


@pytest.mark.parametrize('version,arch', BUILDS)
def test_built_library_carries_its_version_and_says_it_is_a_stand_in(version, arch):
    data = read(built(version, arch))
    assert b'rkllm-runtime version: %s ' % version.encode() in data
    assert b'lab stand-in' in data
    other = [v for v in VERSIONS if v != version]
    assert all(b'rkllm-runtime version: %s ' % v.encode() not in data for v in other)


@pytest.mark.parametrize('version,arch', BUILDS)
def test_built_library_has_no_build_id_or_build_paths(version, arch):
    data = read(built(version, arch))
    assert b'.note.gnu.build-id' not in data
    assert RUNTIME.encode() not in data and b'/work/' not in data
    assert len(data) < 64 * 1024, 'keep the committed builds small'


@pytest.mark.skipif(platform.machine() != 'x86_64', reason='loads the x86_64 build into this process')
def test_x86_64_build_loads_and_refuses_to_init_without_an_npu():
    lib = ctypes.CDLL(built('1.2.3', 'x86_64'))
    handle = ctypes.c_void_p(1)
    assert lib.rkllm_init(ctypes.byref(handle), None, None) == -1
    assert handle.value is None
    assert lib.rkllm_is_running(None) == 0


def test_rebuilding_gives_the_same_bytes(tmp_path):
    compilers = {'x86_64': shutil.which('x86_64-linux-gnu-gcc') or shutil.which('gcc'),
                 'aarch64': shutil.which('aarch64-linux-gnu-gcc')}
    arches = [a for a, cc in compilers.items() if cc]
    if not arches:
        pytest.skip('no C compiler for the lab architectures on this machine')
    env = dict(os.environ, ARCHES=' '.join(arches))
    subprocess.run(['sh', os.path.join(RUNTIME, 'build.sh'), str(tmp_path)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    for version in VERSIONS:
        for arch in arches:
            assert read(str(tmp_path / version / arch / 'librkllmrt.so')) == read(built(version, arch)), \
                '%s/%s differs from the committed build: run lab/runtime/build.sh and commit dist/' % (version, arch)
    if len(arches) < len(compilers):
        pytest.skip('only checked %s: no compiler for the others' % ', '.join(arches))
