# Layering: every project #include obeys the "May include:" rule of the README
# of its folder (tests/layering/check_layering.py). layering_checker_test runs
# the checker on a small tree with planted violations and compares its report,
# so the repository check cannot pass by checking nothing.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
kvr_test(layering_test
  COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/layering/check_layering.py
    ${PROJECT_SOURCE_DIR}
  TIMEOUT 60)
kvr_test(layering_checker_test
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/layering/check_fixture.sh ${Python3_EXECUTABLE}
  TIMEOUT 60)
