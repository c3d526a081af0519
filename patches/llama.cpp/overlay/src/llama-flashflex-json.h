// flashflex: the one small JSON writer behind every JSON text the runtime produces (build info, statistics,
// routing trace lines). Writes one object at a time; keys are literals, string values are escaped.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace flashflex {

// A JSON string literal for s (quotes added; control characters become spaces).
std::string json_string(const std::string & s);

class json_object {
  public:
    template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
    json_object & add(const char * key, T value) {
        return add_raw(key, std::to_string(value));
    }

    json_object & add(const char * key, bool value) { return add_raw(key, value ? "true" : "false"); }

    json_object & add(const char * key, double value);  // fixed, 6 decimals (seconds, rates)

    json_object & add(const char * key, const std::string & value) { return add_raw(key, json_string(value)); }

    json_object & add(const char * key, const char * value) { return add_raw(key, json_string(value)); }

    // value, or null when it is empty
    json_object & add_or_null(const char * key, const std::string & value);
    // an array of integers
    json_object & add_ints(const char * key, const int32_t * values, size_t n);
    // an array of JSON values written elsewhere (objects, strings)
    json_object & add_array(const char * key, const std::vector<std::string> & items);
    // a value that is JSON already
    json_object & add_raw(const char * key, const std::string & json);

    std::string str() const { return out + "}"; }

  private:
    std::string out = "{";
};

}  // namespace flashflex
