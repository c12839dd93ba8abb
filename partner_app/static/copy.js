// Adds a "Copy" button next to every read-only link field (.copy-source). Without
// JavaScript the field is still there to select and copy by hand.
document.querySelectorAll("input.copy-source").forEach(function (input) {
  var button = document.createElement("button");
  button.type = "button";
  button.className = "small";
  button.textContent = "Copy";
  button.addEventListener("click", function () {
    input.select();
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(done, function () {
        document.execCommand("copy"); done();
      });
    } else {
      document.execCommand("copy"); done();
    }
  });
  input.parentNode.appendChild(button);
});
