# flashflex build wiring, included from src/CMakeLists.txt (the only upstream hunk it needs).
#
# Our sources are compiled outside the unity batches so that adding or changing them does not change
# the batching (and so the ccache keys) of any upstream source file.

set(FLASHFLEX_SERIES_HASH "" CACHE STRING "flashflex: hash of the patch series this tree was built from")

# One file per concern (docs/architecture.md): build info and C API entry points, configurations, call sites,
# shared I/O, JSON, dense streaming's ring layout (pure bookkeeping) and its runtime, the expert bank, its prefetch
# policies, trace replay, the trace writer, devices, a context's memory (what the planner reserves) and ggml's RPC
# backend, and drafting's length.
set(FLASHFLEX_SOURCES
    llama-flashflex.cpp
    llama-flashflex-config.cpp
    llama-flashflex-hooks.cpp
    llama-flashflex-io.cpp
    llama-flashflex-json.cpp
    llama-flashflex-ring.cpp
    llama-flashflex-stream.cpp
    llama-flashflex-bank.cpp
    llama-flashflex-bank-prefetch.cpp
    llama-flashflex-replay.cpp
    llama-flashflex-trace.cpp
    llama-flashflex-rpc.cpp
    llama-flashflex-draft.cpp
)
set(FLASHFLEX_HEADERS
    ../include/llama-flashflex.h
    llama-flashflex-internal.h
    llama-flashflex-runtime.h
    llama-flashflex-config.h
    llama-flashflex-io.h
    llama-flashflex-json.h
    llama-flashflex-ring.h
    llama-flashflex-bank.h
    llama-flashflex-replay.h
    llama-flashflex-trace.h
    llama-flashflex-draft.h
)

target_sources(llama PRIVATE ${FLASHFLEX_SOURCES} ${FLASHFLEX_HEADERS})
set_source_files_properties(${FLASHFLEX_SOURCES} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
# The spec reader parses JSON with the tree's own vendored nlohmann/json (header-only); only it sees the path.
set_property(SOURCE llama-flashflex-config.cpp APPEND PROPERTY INCLUDE_DIRECTORIES "${CMAKE_CURRENT_SOURCE_DIR}/../vendor")

if (FLASHFLEX_SERIES_HASH)
    # Only our source sees the hash, so a new series does not recompile upstream files.
    set_property(SOURCE llama-flashflex.cpp llama-flashflex-config.cpp APPEND PROPERTY
                 COMPILE_DEFINITIONS FLASHFLEX_SERIES_HASH="${FLASHFLEX_SERIES_HASH}")
endif()

# llama.cpp's own programs, built from this same patched tree when flashflex build asks for tools
# (LLAMA_BUILD_TOOLS/LLAMA_BUILD_SERVER, orchestrator/build.py): the ones flashflex runs under a plan ship inside the
# Python package beside the libraries they link (llama-cpp-python's own install rule, RPATH $ORIGIN), and the other
# tools are left out of the build. Deferred to the end of the top-level directory, where every tool target exists.
set(FLASHFLEX_SHIPPED_TOOLS server cli llama-bench perplexity completion CACHE INTERNAL "")
function(flashflex_ship_tools)
    if (NOT COMMAND llama_cpp_python_install_target)
        return()  # a standalone build of the tree: upstream's own install rules apply
    endif()
    get_filename_component(tools_dir "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../tools" ABSOLUTE)
    get_property(subdirs DIRECTORY "${tools_dir}" PROPERTY SUBDIRECTORIES)
    foreach (dir ${subdirs})
        get_filename_component(name "${dir}" NAME)
        get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
        foreach (target ${targets})
            get_target_property(type ${target} TYPE)
            if (name IN_LIST FLASHFLEX_SHIPPED_TOOLS AND type MATCHES "EXECUTABLE|SHARED_LIBRARY")
                llama_cpp_python_install_target(${target})
            elseif (NOT name IN_LIST FLASHFLEX_SHIPPED_TOOLS AND NOT name STREQUAL "ui" AND NOT target STREQUAL "mtmd")
                set_target_properties(${target} PROPERTIES EXCLUDE_FROM_ALL TRUE)
            endif()
        endforeach()
    endforeach()
    # what the shipped programs link: the common library and mtmd (the server's multimodal support, which
    # llama-cpp-python's own mtmd bindings load too)
    llama_cpp_python_install_target(llama-common)
    llama_cpp_python_install_target(mtmd)
endfunction()
if (LLAMA_BUILD_TOOLS)
    cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL flashflex_ship_tools)
endif()
