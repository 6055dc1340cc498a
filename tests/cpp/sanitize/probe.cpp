// Proves the sanitizer build can fail: reads one element past a heap array (ASan) or overflows a
// signed int (UBSan), chosen by argv[1]. ctest runs both with WILL_FAIL, so a sanitizer that
// silently stops reporting turns the build red.
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) return 0;
  volatile int n = 4;
  if (std::strcmp(argv[1], "asan") == 0) {
    std::vector<int> v(n, 1);
    volatile int* p = v.data();
    return p[n];  // one past the end
  }
  if (std::strcmp(argv[1], "ubsan") == 0) {
    volatile int big = 2147483647;
    return (big + n) > 0 ? 0 : 1;  // signed overflow
  }
  return 0;
}
