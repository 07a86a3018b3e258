// A search for a flag (--time-budget) looks for its name: the search engine reads a leading "-"
// as "must not contain", which would find nothing. Typed dashes before a word are dropped.
document.addEventListener("input", function (event) {
  var box = event.target;
  if (!box.matches || !box.matches("[data-md-component=search-query]")) return;
  var value = box.value.replace(/(^|\s)-+(?=\w)/g, "$1");
  if (value !== box.value) box.value = value;
}, true);
