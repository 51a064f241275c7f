# Runs a program with a planted bug: passes when the program fails (non-zero exit or a signal, such as the
# emulator's abort) and its output matches one of the regular expressions in EXPECT_FILE (CKD_EXPECT).
# ctest itself cannot do this: it counts a test killed by a signal as failed whatever its output.
#   cmake -DPROGRAM=<path> -DEXPECT_FILE=<path> -P check_planted.cmake
include("${EXPECT_FILE}")
execute_process(COMMAND "${PROGRAM}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out TIMEOUT 90)
message("${out}")
if(rc STREQUAL "0")
  message(FATAL_ERROR "the planted bug went unnoticed: ${PROGRAM} exited with status 0")
endif()
foreach(pattern IN LISTS CKD_EXPECT)
  if(out MATCHES "${pattern}")
    message("caught as expected (exit: ${rc})")
    return()
  endif()
endforeach()
message(FATAL_ERROR "${PROGRAM} failed (exit: ${rc}) but its output matches none of:\n${CKD_EXPECT}")
