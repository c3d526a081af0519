# flashflex build wiring, included from src/CMakeLists.txt (the only upstream hunk it needs).
#
# Our sources are compiled outside the unity batches so that adding or changing them does not change
# the batching (and so the ccache keys) of any upstream source file.

set(FLASHFLEX_SERIES_HASH "" CACHE STRING "flashflex: hash of the patch series this tree was built from")

set(FLASHFLEX_SOURCES
    llama-flashflex.cpp
    llama-flashflex-config.cpp
    llama-flashflex-stream.cpp
    llama-flashflex-moe.cpp
)

target_sources(llama PRIVATE ${FLASHFLEX_SOURCES} ../include/llama-flashflex.h llama-flashflex-internal.h
               llama-flashflex-runtime.h)
set_source_files_properties(${FLASHFLEX_SOURCES} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)

if (FLASHFLEX_SERIES_HASH)
    # Only our source sees the hash, so a new series does not recompile upstream files.
    set_property(SOURCE llama-flashflex.cpp APPEND PROPERTY
                 COMPILE_DEFINITIONS FLASHFLEX_SERIES_HASH="${FLASHFLEX_SERIES_HASH}")
endif()
