# flashflex build wiring, included from src/CMakeLists.txt (the only upstream hunk it needs).
#
# Our sources are compiled outside the unity batches so that adding or changing them does not change
# the batching (and so the ccache keys) of any upstream source file.

set(FLASHFLEX_SERIES_HASH "" CACHE STRING "flashflex: hash of the patch series this tree was built from")

# One file per concern (docs/architecture.md): build info and C API entry points, configurations, call sites,
# shared I/O, JSON, dense streaming's ring layout (pure bookkeeping) and its runtime, the expert bank, its prefetch
# policies, trace replay, the trace writer, devices, a context's memory (what the planner reserves) and ggml's RPC
# backend.
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
)

target_sources(llama PRIVATE ${FLASHFLEX_SOURCES} ${FLASHFLEX_HEADERS})
set_source_files_properties(${FLASHFLEX_SOURCES} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)

if (FLASHFLEX_SERIES_HASH)
    # Only our source sees the hash, so a new series does not recompile upstream files.
    set_property(SOURCE llama-flashflex.cpp APPEND PROPERTY
                 COMPILE_DEFINITIONS FLASHFLEX_SERIES_HASH="${FLASHFLEX_SERIES_HASH}")
endif()
